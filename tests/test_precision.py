"""bf16 training: the measurement of float32, bf16-weight and bf16-autocast models against the float64 exact twin of
the same weights (the README's precision table, ``benchmarks/bench_precision.py``), an autocast around the whole
measurement, and the callback under ``DPOTrainer(bf16=True)`` on CPU."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from helpers import ScaledLinear, random_batch, tiny_gpt2, tiny_llama

from entangle.capture.logprobs import response_lengths, sequence_logps
from entangle.capture.measure import measure, sequence_gram
from entangle.metrics import batch_weights, pair_frame

pytestmark = pytest.mark.usefixtures("one_thread")

AUTOCAST = "float32 + bf16 autocast"
# Tolerances about 2-3x the largest error measured over the models below (random_batch(4, 101, seed=5)): max |ΔK| /
# max |K| of the Gram entries, max |Δ cosine| of the pairs, median relative error of pred_dlogp_chosen / _rejected.
# The README's precision table (benchmarks/bench_precision.py) finds the same orders on 4-layer GPT-2 and Llama
# (about 1e-6 in float32, 1e-3 in bf16), and about 1e-2 in bf16 on stories260k with HH-RLHF pairs (224 tokens).
TOL = {
    "float32": {"gram": 3e-7, "cosine": 1.5e-7, "pred": 3e-7},
    "bf16 weights": {"gram": 4e-3, "cosine": 4e-3, "pred": 5e-3},
    AUTOCAST: {"gram": 4e-3, "cosine": 2e-3, "pred": 3e-3},
}


def _with_generic_layer(model: torch.nn.Module) -> torch.nn.Module:
    """A layer type without a rule (the generic fallback) inside the first block."""
    torch.manual_seed(0)
    model.model.layers[0].mlp.down_proj = ScaledLinear(48, 32)
    return model


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "llama_tied": lambda: tiny_llama(tie=True),
          "llama_generic": lambda: _with_generic_layer(tiny_llama())}


def _at_precision(model: torch.nn.Module, precision: str):
    """(measured model, the context it is measured in, its weights in float64)."""
    if precision == "bf16 weights":
        model = model.to(torch.bfloat16)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == AUTOCAST else contextlib.nullcontext()
    return model, context, copy.deepcopy(model).to(torch.float64)


def _frames(model, batch, ref, method):
    lengths = response_lengths(batch)
    gram = sequence_gram(model, batch, method=method)
    view = gram if method == "exact" else measure(
        model, batch, structure="pairs", weights=lambda lp: batch_weights("sigmoid", lp, lengths, ref, beta=0.1)).plain
    return gram.matrix, pair_frame(view, "sigmoid", ref, beta=0.1)


@pytest.mark.parametrize("precision", list(TOL))
@pytest.mark.parametrize("arch", list(MODELS))
def test_measurement_against_the_float64_twin(arch, precision):
    """Gram entries, cosines, per-pair predictions and regimes within the precision's tolerance of the float64 twin."""
    model, context, model64 = _at_precision(MODELS[arch](), precision)
    batch = random_batch(4, 101, seed=5)
    with torch.no_grad():
        logps64 = sequence_logps(model64, batch)
    ref = logps64 + torch.randn(logps64.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k64, want = _frames(model64, batch, ref, "exact")
    with context:
        k, got = _frames(model, batch, ref, "auto")
    tol = TOL[precision]
    assert float((k - k64).abs().max() / k64.abs().max()) <= tol["gram"]
    assert float(np.abs(got["cosine"] - want["cosine"]).max()) <= tol["cosine"]
    pred = ["pred_dlogp_chosen", "pred_dlogp_rejected"]
    rel = np.abs(got[pred].to_numpy() - want[pred].to_numpy()) / np.abs(want[pred].to_numpy())
    assert float(np.median(rel)) <= tol["pred"]
    # a regime can only change where a prediction's error reaches its size
    clear = (rel < 0.5).all(1)
    assert clear.sum() >= 3 and (got["regime"][clear] == want["regime"][clear]).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama_generic"])
def test_autocast_around_the_measurement_changes_only_the_forward(arch):
    """Inside torch.autocast the backward hooks and reductions would run in bf16 too: the engine turns autocast off
    for them, so an autocast around the whole measurement equals an autocast around the forward alone (as
    accelerate wraps model.forward under Trainer(bf16=True))."""
    model = MODELS[arch]()
    batch = random_batch(3, 101, seed=6)
    forward_only = copy.deepcopy(model)
    forward_only.forward = torch.autocast("cpu", dtype=torch.bfloat16)(forward_only.forward)
    weights = torch.tensor([0.7, -1.3, 0.2, 2.0, -0.4, 1.1], dtype=torch.float64)
    for method in ("ghost", "materialise"):
        want = measure(forward_only, batch, method=method)
        pairs_want = measure(forward_only, batch, method=method, structure="pairs", weights=weights)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = measure(model, batch, method=method)
            pairs_got = measure(model, batch, method=method, structure="pairs", weights=weights)
        assert torch.equal(got.plain.matrix, want.plain.matrix), method
        assert torch.equal(pairs_got.plain.stats, pairs_want.plain.stats), method
        assert got.plain.matrix.dtype == torch.float64
    # the forward did run in bf16: float32 accuracy is out of reach
    k32 = sequence_gram(model, batch).matrix
    assert float((want.plain.matrix - k32).abs().max() / k32.abs().max()) > 1e-4


@pytest.mark.slow
def test_callback_under_dpo_trainer_bf16(tmp_path):
    """DPOTrainer(bf16=True) on CPU: accelerate runs the forward under bf16 autocast, the callback measures that
    forward, and its tables are finite and within the autocast tolerance of a float64 exact measurement of the
    final weights (the last measurement is of the final parameters)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
    from entangle.integrations.callback import EntanglementCallback
    from entangle.runio import read_run

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in builtin_pairs(40, seed=1)]
    tok = builtin_tokenizer()
    model = builtin_model(tok)
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=3, report_to=[], save_strategy="no", use_cpu=True,
                     bf16=True, logging_steps=1, seed=0, per_device_train_batch_size=4, learning_rate=1e-3,
                     disable_tqdm=True)
    cb = EntanglementCallback(rows[:6], every=2, strict=True)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=Dataset.from_list(rows[6:]), processing_class=tok, callbacks=[cb])
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16" and next(model.parameters()).dtype == torch.float32
    run = read_run(tmp_path / "out" / "entangle")
    pairs, updates = run["pairs"], run["updates"]
    assert sorted(pairs["step"].unique()) == [0, 2, 3]
    numeric = ["logp_chosen", "logp_rejected", "norm2_chosen", "norm2_rejected", "inner", "cosine",
               "pred_dlogp_chosen", "pred_dlogp_rejected", "batch_dlogp_chosen", "batch_dlogp_rejected"]
    assert np.isfinite(pairs[numeric].to_numpy(float)).all()
    assert np.isfinite(updates[["logp_before", "logp_after", "observed", "pred_update"]].to_numpy(float)).all()

    final = pairs[pairs["step"] == 3].sort_values("pair")
    model64 = type(model)(model.config)
    model64.load_state_dict(model.state_dict())
    k = sequence_gram(model64.to(torch.float64).eval(), cb.monitor.probe.batch, method="exact").matrix.numpy()
    b = len(final)
    idx = np.arange(b)
    want = np.stack([k[idx, idx], k[idx + b, idx + b], k[idx, idx + b]], 1)
    got = final[["norm2_chosen", "norm2_rejected", "inner"]].to_numpy(float)
    err = np.abs(got - want).max() / np.abs(k).max()
    assert err <= TOL[AUTOCAST]["gram"]
    assert err > 1e-5          # the measured forward is the bf16 one training runs, not a float32 one
