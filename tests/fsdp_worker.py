"""torchrun script of tests/test_fsdp.py: two CPU processes (gloo) measure models sharded by ``fully_shard``.

For a tiny GPT-2 (tied embeddings), a tiny Llama and the pretrained stories260k (tied), each process builds the
model twice from the same seed: one copy is sharded (each block, then the root) and trained with AdamW, the other
stays whole and is trained the same way (every rank trains on the same batch, so the reduce-scattered gradient is
the whole model's). Then, on HH-RLHF pairs:

* the Monitor (probe split across the ranks) measures the sharded model at an update with the Adam view and the
  update dots (``before_update(measure=True)`` / ``after_update``), and rank 0 measures the whole twin alone;
  their run directories are compared by the test;
* token maps (``full`` and ``head``) of every probe pair, every rank mapping the same pair, against the whole twin's,
  and the Monitor's ``tokens`` table against the twin Monitor's; a rank mapping another pair than rank 0 is refused;
* stories260k is saved as accelerate's FSDP plugin saves a ``SHARDED_STATE_DICT`` checkpoint (a
  ``torch.distributed.checkpoint`` folder of both ranks' shards beside ``config.json``), and its whole twin with
  ``save_pretrained``, for the test to analyse in one process;
* each rank measures its own pairs with ``measure`` (``structure="full"`` and ``"pairs"``) in both geometries and
  along the update, on the sharded model and on the twin; the largest relative differences go to ``result.json``;
* in-pass capture: each rank runs one hand-written DPO step on its own pairs (the loss from the logits, or from TRL's
  fused LM head) on a sharded copy under a ``PassRecorder`` and on one without it, in several ``fully_shard``
  layouts; the records are compared with the same pass recorded on the whole model and with its exact twin, the
  gradients and the weights after the step with those of the copy without the recorder.

Usage: ``torchrun --nproc-per-node 2 tests/fsdp_worker.py OUT_DIR``.
"""

from __future__ import annotations

import copy
import gzip
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from helpers import tiny_gpt2, tiny_llama  # noqa: E402

from entangle.capture.inpass import MicroBatch, PassRecorder  # noqa: E402
from entangle.capture.logprobs import sequence_logps, token_logps  # noqa: E402
from entangle.capture.measure import measure, sequence_gram  # noqa: E402
from entangle.capture.optim import adam_preconditioner  # noqa: E402
from entangle.capture.params import select_params  # noqa: E402
from entangle.capture.sharding import local as local_tensor  # noqa: E402
from entangle.capture.sharding import whole as whole_tensor  # noqa: E402
from entangle.capture.tokens import token_gram, token_map  # noqa: E402
from entangle.data import encode_pairs, load_pairs  # noqa: E402
from entangle.integrations.distributed import gather_to_main  # noqa: E402
from entangle.integrations.monitor import Monitor  # noqa: E402

N_PROBE = 3          # uneven: rank 0 measures pairs 0 and 2, rank 1 pair 1
MAX_LENGTH = 64     # the tiny models' positions


def hh_pairs(tok, n: int, max_length: int = MAX_LENGTH) -> list[dict]:
    """The first ``n`` HH-RLHF pairs whose prompt and longer response fit in ``max_length`` tokens."""
    with gzip.open(HERE / "data" / "hh-rlhf-harmless-test.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = load_pairs([json.loads(line) for line in f])

    def length(text: str) -> int:
        return len(tok(text)["input_ids"])

    out = []
    for r in rows:
        if length(r["prompt"]) + max(length(r["chosen"]), length(r["rejected"])) <= max_length:
            out.append(r)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} HH pairs fit in {max_length} tokens")


def stories():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(HERE / "data" / "stories260k").eval()


MODELS = {"gpt2": lambda: tiny_gpt2(vocab=512), "llama": lambda: tiny_llama(vocab=512), "stories260k": stories}


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict, monitor: Monitor | None = None,
               step: int = 0) -> None:
    """One AdamW step on the batch's summed log-likelihood; a ``monitor`` measures it as the callback does."""
    opt.zero_grad()
    (-sequence_logps(model, batch).sum()).backward()
    if monitor is not None:
        monitor.before_update(step, optimizer=opt, measure=True)
    opt.step()
    if monitor is not None:
        monitor.after_update(step)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of ``want``."""
    return float((got - want).abs().max() / want.abs().max())


def check_model(name: str, out: Path, tok, probe: list[dict], train: dict) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)
    sharded, whole = MODELS[name](), MODELS[name]()
    for block in blocks(sharded):
        fully_shard(block)
    fully_shard(sharded)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (sharded, whole)}
    kw = {"objective": "sigmoid", "beta": 0.1, "ref_logps": "initial", "max_length": MAX_LENGTH, "strict": True}
    monitor = Monitor(sharded, tok, probe, out_dir=out / name / "sharded", **kw)
    twin = Monitor(whole, tok, probe, out_dir=out / name / "whole", distributed=False, **kw) if rank == 0 else None
    for m in (sharded, whole):              # Adam has state after one step
        train_step(m, opts[m], train)
    # the Monitor at update 2: measurement with the Adam view, and the update's first-order prediction
    for mon, m in ((monitor, sharded), (twin, whole)):
        train_step(m, opts[m], train, mon, 2)
    # measure() on this rank's pairs: both geometries and the update dots, full and pairs structure
    local = encode_pairs(tok, probe[rank::2], max_length=MAX_LENGTH)
    pre = {m: adam_preconditioner(opts[m], m) for m in (sharded, whole)}
    before = {m: {n: p.detach().clone() for n, p in m.named_parameters()} for m in (sharded, whole)}
    for m in (sharded, whole):
        train_step(m, opts[m], train)
    delta = {m: {n: p.detach() - before[m][n] for n, p in m.named_parameters()} for m in (sharded, whole)}
    errors, sizes = {}, {}
    weights = torch.linspace(-1.0, 1.0, local["input_ids"].shape[0], dtype=torch.float64)
    for structure in ("full", "pairs"):
        extra = {"structure": "pairs", "weights": weights} if structure == "pairs" else {}
        got, want = (measure(m, local, preconditioner=pre[m], delta=delta[m], **extra) for m in (sharded, whole))
        for view in ("plain", "preconditioned"):
            value = "matrix" if structure == "full" else "stats"
            a, b = getattr(getattr(got, view), value), getattr(getattr(want, view), value)
            errors[f"{structure}/{view}"], sizes[f"{structure}/{view}"] = rel(a, b), float(b.abs().max())
        errors[f"{structure}/update"], sizes[f"{structure}/update"] = rel(got.update, want.update), \
            float(want.update.abs().max())
    # training under the Monitor is the whole twin's training
    drift = max(float((whole_tensor(p.detach()) - q).abs().max()) for p, q in zip(sharded.parameters(),
                                                                                  whole.parameters(), strict=True))
    if name == "stories260k":      # a checkpoint as accelerate's FSDP plugin saves it with SHARDED_STATE_DICT
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        saved = out / "fsdp_checkpoints" / "checkpoint-3"
        dcp.save({"model": get_model_state_dict(sharded)},
                 storage_writer=dcp.FileSystemWriter(str(saved / "pytorch_model_fsdp_0")))
        if rank == 0:
            whole.config.save_pretrained(saved)
            tok.save_pretrained(saved)
            whole.save_pretrained(out / "whole_checkpoint")
            (out / "probe.json").write_text(json.dumps(probe))
    # token maps: a collective on the sharded model (every rank maps the same pair), equal to the whole model's
    every = encode_pairs(tok, probe, max_length=MAX_LENGTH)
    with warnings.catch_warnings(record=True) as caught:        # the block-wise pass, no fallback to copies
        warnings.simplefilter("always")
        for method in ("full", "head"):
            for pair in range(len(probe)):
                got, want = (token_gram(m, every, pair, method=method)[0] for m in (sharded, whole))
                key = f"tokens/{method}"
                errors[key] = max(errors.get(key, 0.0), rel(got, want))
                sizes[key] = max(sizes.get(key, 0.0), float(want.abs().max()))
    fallbacks = [str(w.message) for w in caught if "prefix copies" in str(w.message)]
    monitor.token_maps(pairs=[0, 2], step=3)
    if twin is not None:
        twin.token_maps(pairs=[0, 2], step=3)
    refused = {}
    for what, call in (("exact", lambda: measure(sharded, local, method="exact")),
                       ("token_map", lambda: token_map(sharded, local))):    # each rank its own pairs
        try:
            call()
        except ValueError as e:
            refused[what] = str(e)
    return {"errors": errors, "sizes": sizes, "drift": drift, "sharded": type(next(sharded.parameters())).__name__,
            "refused": refused, "token_fallbacks": fallbacks}


# in-pass cases: model -> (fully_shard layout, loss path). Layouts: "blocks": each block, then the root;
# "accelerate": accelerate's FSDP2 layout (blocks; the final norm, the head and a tied input embedding as one group
# that stays gathered after its forward; then the root); "alone": the untied embedding and head each sharded alone
# (TRL gathers the head, whose forward never runs), the root resharding after its forward. Loss paths: "logits"
# (the loss from the logits), "fused" (from TRL's fused LM head: per-token log-probs, no logits).
IN_PASS = {"gpt2": (("blocks", "logits"),), "stories260k": (("blocks", "fused"), ("accelerate", "logits")),
           "llama": (("alone", "fused"),)}


def shard(model: torch.nn.Module, layout: str) -> None:
    for block in blocks(model):
        fully_shard(block)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embed.weight is head.weight
    if layout == "accelerate":
        norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
        if not tied:
            fully_shard(embed)
        fully_shard([norm, embed, head] if tied else [norm, head], reshard_after_forward=False)
    elif layout == "alone":
        fully_shard(embed)
        fully_shard(head)
    fully_shard(model, reshard_after_forward=True if layout == "alone" else None)


def dpo_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict, fused: bool,
             recorder: PassRecorder | None = None) -> list[MicroBatch]:
    """One step of a hand-written DPO-like loss Σ_i -log σ(β (s_w - s_l)) of the summed response log-probs
    (computed from the logits, or by TRL's fused head), recorded by ``recorder`` if given (then the step's record)."""
    def pass_():
        if fused:
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                      fused_lm_head=True).log_probs.sum(-1)
        else:
            s = token_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch).sum(-1)
        b = s.shape[0] // 2
        (-torch.nn.functional.logsigmoid(0.5 * (s[:b] - s[b:]))).sum().backward()

    opt.zero_grad()
    if recorder is None:
        pass_()
        return []
    with recorder.recording() as records:
        pass_()
    return list(records)


def check_in_pass(name: str, batch: dict) -> dict:
    """Per case of ``IN_PASS[name]``: PassRecorder on a sharded copy against the whole model's in-pass record and
    the exact twin; the step (gradients, weights) against a sharded copy trained without the recorder."""
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    fresh = MODELS[name]().train()
    for module in fresh.modules():          # train mode (the recorder measures training passes), no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    twin = sequence_gram(copy.deepcopy(fresh).eval(), batch, method="exact").matrix
    b = twin.shape[0] // 2
    exact = {"norm2": twin.diagonal(), "inner": twin.diagonal(b)}
    out = {}
    for layout, path in IN_PASS[name]:
        fused = path == "fused"
        recorded, plain, whole = (copy.deepcopy(fresh) for _ in range(3))
        for m in (recorded, plain, whole):
            if fused:
                add_fused_lm_head(m)
        for m in (recorded, plain):
            shard(m, layout)
        opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (recorded, plain)}
        ours = dpo_step(recorded, opts[recorded], batch, fused,
                        PassRecorder(recorded, select_params(recorded), strict=True))
        dpo_step(plain, opts[plain], batch, fused)
        grads = all(torch.equal(local_tensor(p.grad), local_tensor(q.grad))
                    for p, q in zip(recorded.parameters(), plain.parameters(), strict=True))
        for m in (recorded, plain):
            opts[m].step()
        weights = all(torch.equal(local_tensor(p.detach()), local_tensor(q.detach()))
                      for p, q in zip(recorded.parameters(), plain.parameters(), strict=True))
        theirs = dpo_step(whole, torch.optim.SGD(whole.parameters()), batch, fused,
                          PassRecorder(whole, select_params(whole), strict=True))
        errors, sizes = {}, {}
        if len(ours) == len(theirs) == 1:
            for key in ("norm2", "inner", "logps", "coef"):
                want = getattr(theirs[0], key)
                errors[f"whole/{key}"], sizes[f"whole/{key}"] = rel(getattr(ours[0], key), want), \
                    float(want.abs().max())
            for key, want in exact.items():         # relative to the largest entry of the twin's Gram matrix
                errors[f"exact/{key}"] = float((getattr(ours[0], key) - want).abs().max() / twin.abs().max())
                sizes[f"exact/{key}"] = float(want.abs().max())
        out[f"{name}/{layout}/{path}"] = {
            "records": [len(ours), len(theirs)], "pairs": len(ours[0].inner) if ours else 0,
            "excluded": int(ours[0].excluded.sum()) if ours else -1, "errors": errors, "sizes": sizes,
            "grads_identical": grads, "weights_identical": weights}
    return out


def main(out: Path) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tok = AutoTokenizer.from_pretrained(HERE / "data" / "stories260k")
    tok.pad_token = tok.eos_token
    rows = hh_pairs(tok, N_PROBE + 2)
    probe, train = rows[:N_PROBE], encode_pairs(tok, rows[N_PROBE:], max_length=MAX_LENGTH)
    results = {name: check_model(name, out, tok, probe, train) for name in MODELS}
    mine = encode_pairs(tok, probe[dist.get_rank()::2], max_length=MAX_LENGTH)
    results["in_pass"] = {case: got for name in IN_PASS for case, got in check_in_pass(name, mine).items()}
    gathered = gather_to_main(results)
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(gathered))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # tear the gloo group down before the interpreter exits (see tests/test_ddp.py)
    dist.barrier()
    dist.destroy_process_group()
