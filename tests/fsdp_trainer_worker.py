"""torchrun script of tests/test_fsdp.py: TRL's ``DPOTrainer`` sharded by accelerate's FSDP plugin (``fsdp_version:
2``) in two CPU processes, with ``EntanglementCallback`` measuring the probe and the training pairs in-pass.

accelerate 1.15 selects its FSDP path only for accelerator devices: on CPU (``use_cpu=True``) it builds a
``MULTI_CPU`` (DDP) state and ignores the FSDP plugin. The one patch below makes that state FSDP when a plugin is
given, so the rest is what a GPU run does: transformers builds the plugin from ``fsdp_config={"version": 2, ...}``,
accelerate's ``fsdp2_prepare_model`` shards the model (and TRL the reference model) with ``fully_shard``, and the
trainer steps a ``DTensor`` optimizer.

The stories260k model (tied embeddings) trains 2 steps on real HH-RLHF pairs (2 per rank, shuffled sampler), once
without entangle and once with the callback. A second callback gathers the whole parameters (``full_tensor``, a
collective) at train begin and at each step end: the two trainings must be bit-identical. After training every rank
calls the callback's ``monitor.token_maps`` (a collective) on two probe pairs. Then rank 0 measures, at each measured step's parameters, the exact twin (one backward per sequence, a whole
model in one process) of every probe pair of the ``pairs`` table and of every ``train_pairs`` row's dataset row, maps
the two pairs' tokens on the whole final model, and writes the largest relative differences to ``result.json``.

Usage: ``torchrun --nproc-per-node 2 tests/fsdp_trainer_worker.py OUT_DIR``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accelerate.state import AcceleratorState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from datasets import Dataset  # noqa: E402
from fsdp_worker import hh_pairs  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from entangle import EntanglementCallback, sequence_gram, token_map  # noqa: E402
from entangle.capture.sharding import whole  # noqa: E402
from entangle.data import encode_pairs  # noqa: E402
from entangle.runio import read_run  # noqa: E402

MAX_LENGTH = 96

_state_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    """accelerate's state as on a GPU machine: FSDP when an FSDP plugin is given, also for CPU processes."""
    _state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _fsdp_on_cpu


class WholeParameters(TrainerCallback):
    """θ_t as whole tensors: at train begin (t = 0) and at the end of every optimizer step (t = global_step)."""

    def __init__(self):
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def _take(self, model, step):
        self.at[step] = {k: whole(v.detach()).clone() for k, v in model.state_dict().items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._take(model, state.global_step)


def rel(got, want) -> float:
    """Largest difference relative to the largest magnitude of ``want``."""
    got, want = torch.tensor(list(got), dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return float((got - want).abs().max() / want.abs().max())


def main(out: Path) -> None:
    torch.set_num_threads(1)
    stories = HERE / "data" / "stories260k"
    tok = AutoTokenizer.from_pretrained(stories)
    tok.pad_token = tok.eos_token
    rows = hh_pairs(tok, 12, MAX_LENGTH)
    probe, train = rows[:4], rows[4:]

    def train_run(name, *callbacks):
        model = AutoModelForCausalLM.from_pretrained(stories)
        args = DPOConfig(output_dir=str(out / name), max_steps=2, per_device_train_batch_size=2,
                         max_length=MAX_LENGTH, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                         bf16=False, logging_steps=1, seed=0, disable_tqdm=True, fsdp=True,
                         fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                      "reshard_after_forward": True})
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=Dataset.from_list(train), processing_class=tok, callbacks=list(callbacks))
        assert trainer.accelerator.distributed_type == DistributedType.FSDP and trainer.is_fsdp_enabled
        trainer.train()
        return trainer

    plain = WholeParameters()
    train_run("plain", plain)                   # the same training without entangle
    params = WholeParameters()
    callback = EntanglementCallback(probe=probe, every=1, train_every=1, strict=True, max_length=MAX_LENGTH)
    trainer = train_run("trainer", params, callback)
    kind = type(next(trainer.model.parameters())).__name__
    # token maps of the final model: every rank calls them (a collective), rank 0 writes the table
    maps = callback.monitor.token_maps(pairs=[0, 3])
    dist.barrier()
    if dist.get_rank() != 0:
        return
    run = read_run(out / "trainer" / "entangle")
    fresh = AutoModelForCausalLM.from_pretrained(stories).eval()

    def at(step):
        fresh.load_state_dict(params.at[step])
        return fresh

    errors, sizes = {}, {}

    def compare(key, twin, got_norm2, got_inner, got_logps):
        k = twin.matrix
        b = k.shape[0] // 2
        scale = float(k.abs().max())
        for name, got, want in (("norm2", got_norm2, k.diagonal()), ("inner", got_inner, k.diagonal(b))):
            err = float((torch.tensor(list(got), dtype=torch.float64) - want).abs().max()) / scale
            errors[f"{key}/{name}"] = max(errors.get(f"{key}/{name}", 0.0), err)
            sizes[f"{key}/{name}"] = max(sizes.get(f"{key}/{name}", 0.0), float(want.abs().max()))
        errors[f"{key}/logps"] = max(errors.get(f"{key}/logps", 0.0), rel(got_logps, twin.logps))
        sizes[f"{key}/logps"] = max(sizes.get(f"{key}/logps", 0.0), float(twin.logps.abs().max()))

    pairs = run["pairs"]
    probe_batch = encode_pairs(tok, probe, max_length=MAX_LENGTH)
    for step, frame in pairs.groupby("step"):
        frame = frame.sort_values("pair")
        twin = sequence_gram(at(int(step)), probe_batch, method="exact")
        compare("probe", twin, list(frame.norm2_chosen) + list(frame.norm2_rejected), frame.inner,
                list(frame.logp_chosen) + list(frame.logp_rejected))
    tp = run["train_pairs"]
    for _, r in tp.iterrows():
        batch = trainer.data_collator([trainer.train_dataset[int(r["index"])]])
        twin = sequence_gram(at(int(r["step"])), batch, method="exact")
        compare("train", twin, [r.norm2_chosen, r.norm2_rejected], [r.inner], [r.logp_chosen, r.logp_rejected])
    final = at(max(params.at))
    probe_batch = encode_pairs(tok, [probe[0], probe[3]], max_length=MAX_LENGTH)
    for j, p in enumerate((0, 3)):
        want = token_map(final, probe_batch, pair=j).sort_values(["block", "t", "u"])
        got = maps[maps["pair"] == p].sort_values(["block", "t", "u"])
        assert len(got) == len(want) > 0 and got["step"].unique().tolist() == [2]
        errors["tokens"] = max(errors.get("tokens", 0.0), rel(got["inner"], want["inner"]))
        sizes["tokens"] = float(want["inner"].abs().max())
    result = {
        "same_training": all(torch.equal(plain.at[t][k], params.at[t][k]) for t in plain.at for k in plain.at[t]),
        "snapshots": sorted(params.at), "tokens_rows": len(run["tokens"]) if "tokens" in run else 0,
        "parameters": kind, "model": type(trainer.model).__name__,
        "probe_steps": sorted(int(s) for s in pairs["step"].unique()), "probe_pairs": int(pairs["pair"].nunique()),
        "train_steps": sorted(int(s) for s in tp["step"].unique()), "train_rows": len(tp),
        "train_index": [int(i) for i in tp["index"]], "excluded": int(tp["excluded"].sum()),
        "world_size": run["manifest"].get("world_size"), "errors": errors, "sizes": sizes,
        "logged": [h["step"] for h in trainer.state.log_history if "entangle/cosine_mean" in h],
        "logged_train": [h["step"] for h in trainer.state.log_history if "entangle_train/cosine_q50" in h],
    }
    (out / "trainer_result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main(Path(sys.argv[1]))
    dist.barrier()
    dist.destroy_process_group()
