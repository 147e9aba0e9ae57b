"""Optimizer-aware views (THEORY §5): Adam-preconditioned Gram and the update projection vs brute force."""

from __future__ import annotations

import pytest
import torch
from helpers import ScaledLinear, _adam_after_steps, random_batch, tiny_gpt2, tiny_llama

from entangle.capture.measure import measure, sequence_gram, update_dot
from entangle.capture.optim import adam_preconditioner
from entangle.capture.params import select_params

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "llama_tied": lambda **kw: tiny_llama(tie=True, **kw)}


@pytest.mark.parametrize("arch", list(MODELS))
def test_update_dot_matches_exact(arch):
    model = MODELS[arch](dtype=torch.float64)
    batch = random_batch(3, 101, seed=20)
    torch.manual_seed(1)
    delta = {n: torch.randn_like(p) * 1e-3 for n, p in select_params(model)}
    pred, logps = update_dot(model, batch, delta)
    exact, exact_logps = update_dot(model, batch, delta, method="exact")
    assert pred.dtype == torch.float64 and pred.shape == (6,)
    torch.testing.assert_close(pred, exact, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(logps, exact_logps, rtol=1e-12, atol=1e-12)
    # sanity of the definition itself: it is the directional derivative of the log-probs
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, d in delta.items():
            params[n].add_(0.1 * d)
        from entangle.capture.logprobs import sequence_logps
        plus = sequence_logps(model, batch).double()
        for n, d in delta.items():
            params[n].sub_(0.2 * d)
        minus = sequence_logps(model, batch).double()
        for n, d in delta.items():
            params[n].add_(0.1 * d)
    # central difference (Llama's RMSNorm runs in float32, so the step cannot be tiny)
    torch.testing.assert_close((plus - minus) / 0.2, pred, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioned_gram_matches_exact(arch, amsgrad):
    model = MODELS[arch](dtype=torch.float64)
    batch = random_batch(3, 101, seed=21)
    opt = _adam_after_steps(model, batch, amsgrad=amsgrad)
    P = adam_preconditioner(opt, model)
    got = sequence_gram(model, batch, preconditioner=P)
    exact = sequence_gram(model, batch, preconditioner=P, method="exact")
    assert float((got.matrix - exact.matrix).abs().max() / exact.matrix.abs().max()) < 1e-10
    # the geometry matters: the preconditioned matrix is not a rescaled plain one
    plain = sequence_gram(model, batch).matrix
    cos = lambda K: K / torch.sqrt(torch.outer(K.diag(), K.diag()))  # noqa: E731
    assert float((cos(got.matrix) - cos(plain)).abs().max()) > 1e-3


def test_adam_preconditioner_definition():
    model = tiny_llama(dtype=torch.float64)
    batch = random_batch(2, 101, seed=22)
    opt = _adam_after_steps(model, batch, steps=3)
    P = adam_preconditioner(opt, model)
    name, p = next(iter(model.named_parameters()))
    st = opt.state[p]
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    expected = 1 / ((st["exp_avg_sq"] / (1 - beta2 ** 3)).sqrt() + eps)
    torch.testing.assert_close(P[name], expected)


def test_bad_optimizer_inputs():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="no state for 'transformer.wte.weight'"):
        adam_preconditioner(torch.optim.Adam(model.parameters()), model)
    with pytest.raises(TypeError, match="Adam/AdamW"):
        adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1), model)
    batch = random_batch(2, 101)
    with pytest.raises(ValueError, match="delta has no entry"):
        update_dot(model, batch, {})
    delta = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    delta["transformer.wte.weight"] = torch.full_like(delta["transformer.wte.weight"], float("nan"))
    with pytest.raises(ValueError, match="NaN/inf"):
        update_dot(model, batch, delta)


def test_plain_and_preconditioned_from_one_pass():
    model = tiny_gpt2(dtype=torch.float64)
    batch = random_batch(3, 101, seed=23)
    P = adam_preconditioner(_adam_after_steps(model, batch), model)
    both = measure(model, batch, preconditioner=P)
    assert (both.plain.geometry, both.preconditioned.geometry, both.update) == ("plain", "preconditioned", None)
    # (a plain-only pass reduces small layers together, stacked: equal up to the order of float64 sums)
    torch.testing.assert_close(both.plain.matrix, sequence_gram(model, batch).matrix, rtol=1e-12, atol=0)
    alone = sequence_gram(model, batch, preconditioner=P)
    assert alone.geometry == "preconditioned" and torch.equal(both.preconditioned.matrix, alone.matrix)
    assert measure(model, batch).preconditioned is None
    only = measure(model, batch, plain=False, preconditioner=P)
    assert only.plain is None and torch.equal(only.preconditioned.matrix, alone.matrix)
    exact = measure(model, batch, preconditioner=P, method="exact")
    torch.testing.assert_close(exact.plain.matrix, both.plain.matrix, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(exact.preconditioned.matrix, both.preconditioned.matrix, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="nothing to measure"):
        measure(model, batch, plain=False)


def _with_generic_layer(model):
    """The Llama test model with one layer type no rule knows (its dots come from the generic fallback)."""
    torch.manual_seed(0)
    model.model.layers[0].mlp.down_proj = ScaledLinear(48, 32).to(torch.float64)
    return model


@pytest.mark.parametrize("arch", [*MODELS, "llama_generic"])
def test_gram_and_update_prediction_from_one_pass(arch):
    """measure(delta=...) gives the Gram matrices of both geometries and <g_i, delta> from one pass, equal
    to the separate passes (and to the exact twins)."""
    model = _with_generic_layer(tiny_llama(dtype=torch.float64)) if arch == "llama_generic" \
        else MODELS[arch](dtype=torch.float64)
    batch = random_batch(3, 101, seed=24)
    P = adam_preconditioner(_adam_after_steps(model, batch), model)
    torch.manual_seed(2)
    delta = {n: torch.randn_like(p) * 1e-3 for n, p in select_params(model)}
    fused = measure(model, batch, preconditioner=P, delta=delta)
    separate = measure(model, batch, preconditioner=P)
    alone, logps = update_dot(model, batch, delta)
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.update, alone, **close)
    torch.testing.assert_close(fused.logps, logps, **close)
    for got, want in ((fused.plain, separate.plain), (fused.preconditioned, separate.preconditioned)):
        torch.testing.assert_close(got.matrix, want.matrix, **close)
        assert got.per_param.keys() == want.per_param.keys()
        for name in got.per_param:
            torch.testing.assert_close(got.per_param[name], want.per_param[name], **close)
    assert not any(v.endswith(":dot") for v in fused.info.values())
    assert any(v.startswith("generic") for v in fused.info.values()) == (arch == "llama_generic")
    exact = measure(model, batch, preconditioner=P, delta=delta, method="exact")
    torch.testing.assert_close(exact.update, fused.update, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(exact.preconditioned.matrix, fused.preconditioned.matrix, **close)
    # without a preconditioner: the plain Gram and the dots
    plain = measure(model, batch, delta=delta)
    assert plain.preconditioned is None
    torch.testing.assert_close(plain.plain.matrix, separate.plain.matrix, **close)
    pred_plain = plain.update
    torch.testing.assert_close(pred_plain, alone, **close)
