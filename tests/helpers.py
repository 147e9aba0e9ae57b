"""Plain helpers shared by the test files: small models built from config, hand-made batches, the end-to-end
run-directory check, and process/CLI runners. Fixtures live in conftest.py; test files import only from here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch

from entangle.capture.logprobs import sequence_logps
from entangle.cli import main
from entangle.metrics import PAIR_COLUMNS
from entangle.runio import read_run


def tiny_gpt2(seed: int = 0, vocab: int = 101, dtype=torch.float32, **kw):
    """A 2-layer GPT-2 (Conv1D, tied embeddings) from config, seeded, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=1, eos_token_id=2, **kw)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_llama(seed: int = 0, vocab: int = 101, tie: bool = False, dtype=torch.float32, **kw):
    """A 2-layer Llama (GQA, RMSNorm) from config, seeded, in eval mode, with generic (perturbed) norm weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie, **kw,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    # random init leaves norm weights at 1: perturb them so their gradients are generic
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_batch(n_pairs: int, vocab: int, prompt_len=(3, 7), resp_len=(2, 9), padding_side="right", seed=0):
    """A hand-made batch of 2B sequences (chosen then rejected) with shared prompts and padding."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n_pairs):
        p = torch.randint(3, vocab, (int(torch.randint(*prompt_len, (1,), generator=g)),), generator=g)
        seqs.append((p, torch.randint(3, vocab, (int(torch.randint(*resp_len, (1,), generator=g)),), generator=g)))
    rej = [(p, torch.randint(3, vocab, (int(torch.randint(*resp_len, (1,), generator=g)),), generator=g)) for p, _ in seqs]
    allseq = seqs + rej
    L = max(len(p) + len(r) for p, r in allseq)
    N = len(allseq)
    ids = torch.zeros(N, L, dtype=torch.long)
    att = torch.zeros(N, L, dtype=torch.long)
    comp = torch.zeros(N, L, dtype=torch.long)
    for i, (p, r) in enumerate(allseq):
        n = len(p) + len(r)
        off = L - n if padding_side == "left" else 0
        ids[i, off:off + n] = torch.cat([p, r])
        att[i, off:off + n] = 1
        comp[i, off + len(p):off + n] = 1
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp}


class ScaledLinear(torch.nn.Module):
    """A layer type no rule knows: the engine must use the generic per-example fallback."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.gain = torch.nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * self.gain.tanh()


def _adam_after_steps(model, batch, steps=2, amsgrad=False):
    """An AdamW optimizer with state after ``steps`` steps on the batch's summed log-likelihood (.grad cleared)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=amsgrad)
    for _ in range(steps):
        opt.zero_grad()
        (-sequence_logps(model, batch).sum()).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


LAYER_COLUMNS = ["step", "pair", "layer", "inner", "norm2_chosen", "norm2_rejected", "cosine"]
UPDATE_COLUMNS = ["step", "seq", "pair", "side", "logp_before", "logp_after", "observed", "pred_update",
                  "pred_gradient"]


def check_run(run_dir, n_pairs: int, steps: list[int], update_steps: list[int], log_history: list[dict],
              objective: str | None = None) -> dict:
    """Run directory content, logged scalars and the first-order check shared by every end-to-end test."""
    run = read_run(run_dir)
    pairs, layers, updates = run["pairs"], run["layers"], run["updates"]
    assert set(PAIR_COLUMNS) | {"step"} <= set(pairs.columns)
    assert list(layers.columns) == LAYER_COLUMNS and list(updates.columns) == UPDATE_COLUMNS
    # one row per probe pair per measured step; one row per probe sequence per measured update
    assert sorted(pairs["step"].unique()) == steps
    assert (pairs.groupby("step")["pair"].apply(sorted).map(list) == [list(range(n_pairs))] * len(steps)).all()
    assert sorted(updates["step"].unique()) == update_steps
    assert (updates.groupby("step").size() == 2 * n_pairs).all()
    assert (layers.groupby(["step", "layer"]).size() == n_pairs).all()
    assert run["summary"]["step"].tolist() == steps
    numeric = ["logp_chosen", "logp_rejected", "norm2_chosen", "norm2_rejected", "inner", "a_chosen", "a_rejected",
               "pred_dlogp_chosen", "pred_dlogp_rejected", "batch_dlogp_chosen", "batch_dlogp_rejected", "loss"]
    assert np.isfinite(pairs[numeric].to_numpy(float)).all()
    assert np.isfinite(layers[["inner", "norm2_chosen", "norm2_rejected"]].to_numpy(float)).all()
    assert np.isfinite(updates[UPDATE_COLUMNS[4:8]].to_numpy(float)).all()
    # the realised update's first-order prediction agrees in sign with the observed change
    moved = updates[updates["observed"].abs() > 1e-3]
    assert len(moved) >= len(updates) // 2
    assert (np.sign(moved["observed"]) == np.sign(moved["pred_update"])).mean() >= 0.9
    # scalars reached the trainer's log history
    # each measured step logged once, in order, with the run directory's number (a trainer's record names its step)
    logged = [h for h in log_history if "entangle/cosine_mean" in h]
    assert len(logged) == len(steps), [h.get("step") for h in logged]
    summary = run["summary"].set_index("step")
    for record, step in zip(logged, steps, strict=True):
        assert record.get("step", step) == step
        assert record["entangle/cosine_mean"] == summary.loc[step, "cosine_mean"]
    assert any("entangle/update/sign_agreement" in h for h in log_history)
    manifest = run["manifest"]
    assert manifest["probe"]["pairs"] == n_pairs and len(manifest["probe"]["sha256"]) == 64
    if objective is not None:
        assert manifest["objective"] == objective
    return run


def _one_line_error(capsys, argv: list[str], code: int = 1, match: str = "") -> str:
    """Run ``main(argv)``; check the exit code and that stderr holds one error line (notes aside)."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage errors exit
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and match in lines[0], err
    return lines[0]


def run_torchrun(cmd: list[str], completed, env: dict, timeout: int = 240):
    """Run a torchrun command; returns the process.

    gloo's threads occasionally abort ("terminate called without an active exception") at interpreter exit on
    one rank AFTER a complete run. That teardown flake of the backend is accepted only when ``completed`` (a
    file the script writes once all ranks have finished their work) exists; the caller then checks the outputs.
    Any other failure fails the test with the processes' output.
    """
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    teardown_abort = "terminate called without an active exception" in proc.stderr and Path(completed).exists()
    assert proc.returncode == 0 or teardown_abort, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
