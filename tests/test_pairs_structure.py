"""measure(structure="pairs") / pair_statistics: the within-pair Gram entries and K c without forming K, against the exact twin
(one backward per sequence, flattened gradients) on GPT-2 (Conv1D, tied embeddings), Llama (RMSNorm, untied and
tied) and a layer type without a rule, with padding, in float64, float32 and bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ScaledLinear, _adam_after_steps, random_batch, tiny_gpt2, tiny_llama

from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
from entangle.capture.logprobs import response_lengths, sequence_logps
from entangle.capture.measure import measure, pair_statistics, sequence_gram
from entangle.capture.optim import adam_preconditioner
from entangle.capture.params import select_params
from entangle.capture.result import PairStats
from entangle.data import encode_pairs
from entangle.integrations.monitor import Monitor
from entangle.metrics import batch_weights, pair_frame
from entangle.runio import read_run

MODELS = {
    "gpt2": lambda dtype: tiny_gpt2(dtype=dtype),
    "llama": lambda dtype: tiny_llama(dtype=dtype),
    "llama_tied": lambda dtype: tiny_llama(tie=True, dtype=dtype),
    "llama_generic": lambda dtype: _with_generic_layer(tiny_llama(dtype=dtype), dtype),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _with_generic_layer(model, dtype):
    """A layer type without a rule (the generic fallback) inside the first block."""
    torch.manual_seed(0)
    model.model.layers[0].mlp.down_proj = ScaledLinear(48, 32).to(dtype)
    return model


def _within(block: torch.Tensor) -> torch.Tensor:
    """[3, N] from a Gram block [N, N]: the diagonal, each sequence's entry with its pair partner, and nothing else."""
    n = block.shape[0]
    idx = torch.arange(n)
    return torch.stack([block[idx, idx], block[idx, (idx + n // 2) % n]])


def assert_pairs_match(got, full, weights, tol):
    """``got`` (a PairStats) holds exactly the within-pair entries of ``full`` (a GramResult) and K c."""
    assert isinstance(got, PairStats) and got.geometry == full.geometry
    scale = float(full.matrix.abs().max())
    assert float((got.stats[:2] - _within(full.matrix)).abs().max()) <= tol * scale
    norm2, inner = got.within_pair()
    torch.testing.assert_close(norm2, got.stats[0])
    torch.testing.assert_close(inner, got.stats[1, :got.n_pairs])
    kc = full.matrix @ weights.to(full.matrix)
    assert float((got.kc - kc).abs().max()) <= tol * float(full.matrix.abs().sum(1).max() * weights.abs().max())
    assert got.per_param.keys() == full.per_param.keys()
    for name, block in full.per_param.items():
        assert got.per_param[name].shape == (3, block.shape[0]), name
        assert float((got.per_param[name][:2] - _within(block)).abs().max()) <= tol * scale, name
    torch.testing.assert_close(got.weights.cpu(), weights.to(torch.float64))


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pairs_match_the_exact_twin(arch, dtype, padding_side):
    model = MODELS[arch](dtype)
    batch = random_batch(3, 101, padding_side=padding_side, seed=31)
    weights = torch.tensor([0.7, -1.3, 0.2, 2.0, -0.4, 1.1], dtype=torch.float64)
    exact = sequence_gram(model, batch, method="exact")
    got = pair_statistics(model, batch, weights)
    assert_pairs_match(got, exact, weights, TOL[dtype])
    if arch == "llama_generic":
        assert got.info["model.layers.0.mlp.down_proj.gain"].startswith("generic")
    # the exact method gives the same structure (the slow twin of this path)
    assert_pairs_match(pair_statistics(model, batch, weights, method="exact"), exact, weights, 1e-12)
    assert_pairs_match(exact.pairs(weights), exact, weights, 1e-12)


@pytest.mark.parametrize("arch", list(MODELS))
def test_pairs_with_adam_geometry_and_update_from_one_pass(arch):
    model = MODELS[arch](torch.float64)
    batch = random_batch(3, 101, seed=32)
    P = adam_preconditioner(_adam_after_steps(model, batch), model)
    torch.manual_seed(3)
    delta = {n: torch.randn_like(p) * 1e-3 for n, p in select_params(model)}
    exact = measure(model, batch, preconditioner=P, delta=delta, method="exact")
    weights = torch.linspace(-1, 1, 6, dtype=torch.float64)
    got = measure(model, batch, preconditioner=P, delta=delta, structure="pairs", weights=weights)
    assert_pairs_match(got.plain, exact.plain, weights, 1e-10)
    assert_pairs_match(got.preconditioned, exact.preconditioned, weights, 1e-10)
    torch.testing.assert_close(got.update, exact.update, rtol=1e-10, atol=1e-14)


def test_weights_from_the_log_probs_of_the_same_pass():
    """A callable gets the pass's own log-probs: K c with the batch-mean DPO coefficients at those log-probs."""
    model = tiny_gpt2(dtype=torch.float64)
    batch = random_batch(4, 101, seed=33)
    ref = torch.linspace(-30, -10, 8, dtype=torch.float64)
    lengths = response_lengths(batch)
    seen = []

    def weights(logps):
        seen.append(logps.clone())
        return batch_weights("sigmoid", logps, lengths, ref, beta=0.1)

    got = pair_statistics(model, batch, weights)
    full = sequence_gram(model, batch)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], full.logps, rtol=1e-12, atol=1e-12)
    c = batch_weights("sigmoid", full.logps, lengths, ref, beta=0.1)
    assert_pairs_match(got, full, c, 1e-10)
    # pair_frame reads K c from the result and gives the full result's frame
    a = pair_frame(got, "sigmoid", ref, beta=0.1)
    b = pair_frame(full, "sigmoid", ref, beta=0.1)
    numeric = b.select_dtypes("number").columns
    np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=1e-9, atol=1e-12)
    assert (a["regime"] == b["regime"]).all()
    with pytest.raises(ValueError, match="other weights"):      # K c of other coefficients is never used silently
        pair_frame(got, "ipo", ref, beta=0.1)


def test_bad_pairs_arguments():
    model = tiny_gpt2(dtype=torch.float64)
    batch = random_batch(2, 101, seed=34)
    with pytest.raises(ValueError, match="needs weights"):
        measure(model, batch, structure="pairs")
    with pytest.raises(ValueError, match='apply to structure="pairs" only'):
        measure(model, batch, weights=torch.ones(4))
    with pytest.raises(ValueError, match="unknown structure"):
        measure(model, batch, structure="diagonal", weights=torch.ones(4))
    with pytest.raises(ValueError, match="3 entries for 4 sequences"):
        pair_statistics(model, batch, torch.ones(3))
    with pytest.raises(ValueError, match=r"non-finite weights for sequences \[3\] \(pairs \[1\]\)"):
        pair_statistics(model, batch, torch.tensor([1.0, 1.0, 1.0, float("nan")]))
    odd = {k: v[:3] for k, v in batch.items()}
    with pytest.raises(ValueError, match="needs 2B sequences"):
        pair_statistics(model, odd, torch.ones(3))


@pytest.mark.slow
def test_monitor_tables_are_the_same_with_pairs_and_full_structure(tmp_path):
    tok = builtin_tokenizer()
    model = builtin_model(tok).to(torch.float64)
    probe, train = builtin_pairs(6, seed=2), builtin_pairs(16, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitors = {s: Monitor(model, tok, probe, "sigmoid", out_dir=tmp_path / s, ref_logps="initial", strict=True,
                           beta=0.1, structure=s) for s in ("pairs", "full")}
    for step in range(2):
        (-sequence_logps(model, encode_pairs(tok, train[8 * step: 8 * step + 8])).sum()).backward()
        got = {}
        for m in monitors.values():
            m.before_update(step, optimizer=opt, measure=True)
        opt.step()
        for s, m in monitors.items():
            got[s] = m.after_update(step)
        opt.zero_grad()
        assert got["pairs"].keys() == got["full"].keys()
        np.testing.assert_allclose([got["pairs"][k] for k in got["full"]], [got["full"][k] for k in got["full"]],
                                   rtol=1e-9, atol=1e-12)
    a, b = read_run(tmp_path / "pairs"), read_run(tmp_path / "full")
    for name in ("pairs", "summary", "layers", "summary_adam", "updates"):
        assert list(a[name].columns) == list(b[name].columns) and len(a[name]) == len(b[name]) > 0
        numeric = b[name].select_dtypes("number").columns
        np.testing.assert_allclose(a[name][numeric].to_numpy(float), b[name][numeric].to_numpy(float),
                                   rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="structure must be"):
        Monitor(model, tok, probe, "sft", structure="upper")
