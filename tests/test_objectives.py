"""Objectives: closed-form coefficients vs autograd, and losses vs TRL's own loss code."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from entangle.metrics import (
    Objective,
    WeightedObjective,
    available_objectives,
    coefficients,
    register_objective,
    resolve_objective,
)

B = 6
TRL_DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                 "apo_down", "discopop", "sft", "sigmoid_norm"]


def _pairs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s_w = -torch.rand(B, generator=g, dtype=torch.float64) * 30 - 1
    s_l = -torch.rand(B, generator=g, dtype=torch.float64) * 30 - 1
    return {
        "chosen_logps": s_w, "rejected_logps": s_l,
        "ref_chosen_logps": s_w + torch.randn(B, generator=g, dtype=torch.float64) * 3,
        "ref_rejected_logps": s_l + torch.randn(B, generator=g, dtype=torch.float64) * 3,
        "chosen_lengths": torch.randint(1, 20, (B,), generator=g),
        "rejected_lengths": torch.randint(1, 20, (B,), generator=g),
    }


def _coef(name, x, **hyper):
    """coefficients() with every input of ``x`` (log-probs, references, lengths)."""
    rest = {k: v for k, v in x.items() if k not in ("chosen_logps", "rejected_logps")}
    return coefficients(name, x["chosen_logps"], x["rejected_logps"], **rest, **hyper)


def test_dpo_closed_form():
    x = _pairs()
    beta = 0.3
    a_w, a_l, loss = _coef("sigmoid", x, beta=beta)
    m = (x["chosen_logps"] - x["ref_chosen_logps"]) - (x["rejected_logps"] - x["ref_rejected_logps"])
    torch.testing.assert_close(a_w, beta * torch.sigmoid(-beta * m), rtol=1e-12, atol=0)
    torch.testing.assert_close(a_l, -beta * torch.sigmoid(-beta * m), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, -F.logsigmoid(beta * m))


def test_ipo_closed_form_length_normalised():
    x = _pairs(1)
    beta = 0.1
    a_w, a_l, _ = _coef("ipo", x, beta=beta)
    n_w, n_l = x["chosen_lengths"].double(), x["rejected_lengths"].double()
    m_bar = (x["chosen_logps"] - x["ref_chosen_logps"]) / n_w - (x["rejected_logps"] - x["ref_rejected_logps"]) / n_l
    torch.testing.assert_close(a_w, 2 * (1 / (2 * beta) - m_bar) / n_w)
    torch.testing.assert_close(a_l, -2 * (1 / (2 * beta) - m_bar) / n_l)


def test_simpo_closed_form():
    x = _pairs(2)
    beta, gamma = 2.0, 0.7
    a_w, a_l, _ = _coef("simpo", x, beta=beta, simpo_gamma=gamma)
    n_w, n_l = x["chosen_lengths"].double(), x["rejected_lengths"].double()
    z = beta * (x["chosen_logps"] / n_w - x["rejected_logps"] / n_l) - gamma
    torch.testing.assert_close(a_w, beta * torch.sigmoid(-z) / n_w)
    torch.testing.assert_close(a_l, -beta * torch.sigmoid(-z) / n_l)


def test_cpo_alpha_adds_nll_to_chosen_only():
    x = _pairs(3)
    beta, alpha = 0.5, 0.8
    a_w, a_l, _ = _coef("cpo_sigmoid", x, beta=beta, cpo_alpha=alpha)
    z = beta * (x["chosen_logps"] - x["rejected_logps"])
    torch.testing.assert_close(a_w, beta * torch.sigmoid(-z) + alpha / x["chosen_lengths"].double())
    torch.testing.assert_close(a_l, -beta * torch.sigmoid(-z))
    # batch normalisation: d/ds_w of the batch mean is alpha / sum of chosen lengths
    a_w_b, _, _ = _coef("cpo_sigmoid", x, beta=beta, cpo_alpha=alpha, nll_norm="batch")
    torch.testing.assert_close(a_w_b / B, beta * torch.sigmoid(-z) / B + alpha / x["chosen_lengths"].sum())


def test_orpo_closed_form():
    x = _pairs(4)
    beta = 0.25
    a_w, a_l, _ = _coef("orpo", x, beta=beta)
    n_w, n_l = x["chosen_lengths"].double(), x["rejected_lengths"].double()
    p_w, p_l = x["chosen_logps"] / n_w, x["rejected_logps"] / n_l
    log_odds = (p_w - p_l) - (torch.log(-torch.expm1(p_w)) - torch.log(-torch.expm1(p_l)))
    # d log-odds / d s̄ = 1 + e^s̄ / (1 - e^s̄) = 1 / (1 - e^s̄)
    k = beta * torch.sigmoid(-log_odds)
    torch.testing.assert_close(a_w, 1 / n_w + k / (1 - p_w.exp()) / n_w)
    torch.testing.assert_close(a_l, -k / (1 - p_l.exp()) / n_l)


def test_rdpo_and_dpop_closed_form():
    x = _pairs(5)
    beta, alpha, lam = 0.1, 0.05, 20.0
    m = (x["chosen_logps"] - x["ref_chosen_logps"]) - (x["rejected_logps"] - x["ref_rejected_logps"])
    z = beta * m - alpha * (x["chosen_lengths"] - x["rejected_lengths"]).double()
    a_w, a_l, _ = _coef("rdpo", x, beta=beta, rdpo_alpha=alpha)
    torch.testing.assert_close(a_w, beta * torch.sigmoid(-z))
    torch.testing.assert_close(a_l, -beta * torch.sigmoid(-z))

    below = x["chosen_logps"] < x["ref_chosen_logps"]
    assert below.any() and (~below).any()
    z = beta * (m - lam * (x["ref_chosen_logps"] - x["chosen_logps"]).clamp(min=0))
    a_w, a_l, _ = _coef("dpop", x, beta=beta, dpop_lambda=lam)
    torch.testing.assert_close(a_w, beta * torch.sigmoid(-z) * (1 + lam * below.double()))
    torch.testing.assert_close(a_l, -beta * torch.sigmoid(-z))


def _trl_dpo_loss(loss_types, weights, x, beta=0.1, label_smoothing=0.0, discopop_tau=0.05):
    """TRL 1.16 ``DPOTrainer._compute_loss`` on a fake model whose per-token log-probs we choose.

    Returns the loss and dL/ds_i for every sequence (read off the gradient on any response token).
    """
    from trl import DPOTrainer

    g = torch.Generator().manual_seed(0)
    lengths = torch.cat([x["chosen_lengths"], x["rejected_lengths"]])
    L = int(lengths.max()) + 3
    comp = torch.zeros(2 * B, L, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        comp[i, 2:2 + n] = 1
    s = torch.cat([x["chosen_logps"], x["rejected_logps"]])
    # spread each s_i over its response tokens with random weights
    w = torch.rand(2 * B, L - 1, generator=g, dtype=torch.float64) * comp[:, 1:]
    token_logps = (w / w.sum(1, keepdim=True) * s[:, None]).requires_grad_(True)
    out = SimpleNamespace(log_probs=token_logps, entropy=torch.zeros(2 * B, L - 1), mean_logits=torch.zeros(2 * B, L - 1),
                          is_top1=torch.zeros(2 * B, L - 1, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    fake = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t, gather=lambda t: t),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=loss_types, loss_weights=weights, beta=beta, label_smoothing=label_smoothing,
        args=SimpleNamespace(discopop_tau=discopop_tau), use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(2 * B, L, dtype=torch.long), "attention_mask": torch.ones(2 * B, L),
              "completion_mask": comp, "ref_chosen_logps": x["ref_chosen_logps"],
              "ref_rejected_logps": x["ref_rejected_logps"]}
    loss = DPOTrainer._compute_loss(fake, lambda **kw: out, inputs, False)
    (grad,) = torch.autograd.grad(loss, token_logps)
    first_response_token = comp[:, 1:].argmax(1)
    return loss.detach(), grad[torch.arange(2 * B), first_response_token]


@pytest.mark.parametrize("loss_type", TRL_DPO_TYPES)
def test_matches_trl_dpo_trainer_loss_and_gradient(loss_type):
    pytest.importorskip("trl")
    x = _pairs(7)
    hyper = {"beta": 0.2}
    if loss_type in ("exo_pair", "robust"):
        hyper["label_smoothing"] = 0.1
    if loss_type == "sft":
        hyper = {"nll_norm": "batch"}  # TRL's token mean over the whole batch
    trl_loss, dL_ds = _trl_dpo_loss([loss_type], [1.0], x, beta=0.2, label_smoothing=hyper.get("label_smoothing", 0.0))
    a_w, a_l, loss = _coef(loss_type, x, **hyper)
    # TRL's exo_pair builds log ε from a float32 tensor (~1e-8 relative); everything else agrees to float64
    rtol = 1e-7 if loss_type == "exo_pair" else 1e-10
    torch.testing.assert_close(loss.mean(), trl_loss, rtol=rtol, atol=1e-12)
    # c = a / B is the coefficient of the batch-mean loss: -dL/ds
    torch.testing.assert_close(torch.cat([a_w, a_l]) / B, -dL_ds, rtol=rtol, atol=1e-12)


def test_weighted_combination_matches_trl():
    pytest.importorskip("trl")
    x = _pairs(8)
    trl_loss, dL_ds = _trl_dpo_loss(["sigmoid", "sft", "ipo"], [1.0, 0.5, 0.2], x, beta=0.1)
    a_w, a_l, loss = _coef(["sigmoid", "sft", "ipo"], x, loss_weights=[1.0, 0.5, 0.2], nll_norm="batch")
    torch.testing.assert_close(loss.mean(), trl_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([a_w, a_l]) / B, -dL_ds, rtol=1e-8, atol=1e-12)
    # coefficients are linear in the weights
    parts = [_coef(n, x, **({"nll_norm": "batch"} if n == "sft" else {})) for n in ("sigmoid", "sft", "ipo")]
    torch.testing.assert_close(a_w, sum(w * p[0] for w, p in zip([1.0, 0.5, 0.2], parts, strict=True)))


def test_sft_sequence_vs_batch_normalisation():
    x = _pairs(9)
    a_seq, _, _ = _coef("sft", x)
    a_bat, _, _ = _coef("sft", x, nll_norm="batch")
    torch.testing.assert_close(a_seq, 1 / x["chosen_lengths"].double())
    torch.testing.assert_close(a_bat, B / x["chosen_lengths"].sum().double().expand(B))
    same = dict(x, chosen_lengths=torch.full((B,), 7))
    torch.testing.assert_close(_coef("sft", same)[0], _coef("sft", same, nll_norm="batch")[0])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_matches_trl_cpo_loss(loss_type):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    x = _pairs(10)
    beta, eps, gamma, alpha = 0.3, 0.1, 0.4, 0.7
    avg = loss_type in ("ipo", "simpo")
    n_w, n_l = x["chosen_lengths"].double(), x["rejected_lengths"].double()
    lw, ll = (x["chosen_logps"] / n_w, x["rejected_logps"] / n_l) if avg else (x["chosen_logps"], x["rejected_logps"])
    fake = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=eps, simpo_gamma=gamma, loss_type=loss_type,
                           accelerator=SimpleNamespace(device="cpu"))
    losses, _, _ = CPOTrainer.cpo_loss(fake, lw, ll)
    trl_total = losses.mean() + alpha * (-x["chosen_logps"].sum() / n_w.sum())  # CPO's NLL: token mean over batch
    name = "simpo" if loss_type == "simpo" else f"cpo_{loss_type}"
    hyper = {"beta": beta, "cpo_alpha": alpha, "nll_norm": "batch", "label_smoothing": eps}
    if name == "simpo":
        hyper["simpo_gamma"] = gamma
    _, _, loss = _coef(name, x, **hyper)
    torch.testing.assert_close(loss.mean(), trl_total, rtol=1e-10, atol=1e-12)


def test_matches_trl_orpo_loss():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    x = _pairs(11)
    n_w, n_l = x["chosen_lengths"].double(), x["rejected_lengths"].double()
    fake = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device="cpu"))
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, x["chosen_logps"] / n_w, x["rejected_logps"] / n_l)
    # TRL's NLL also covers prompt tokens; with a response-only NLL (token mean over the batch) they agree
    trl_total = -x["chosen_logps"].sum() / n_w.sum() - losses.mean()
    _, _, loss = _coef("orpo", x, beta=0.2, nll_norm="batch")
    torch.testing.assert_close(loss.mean(), trl_total.double(), rtol=1e-6, atol=1e-8)  # TRL casts to float32


def test_every_objective_runs_and_is_finite():
    x = _pairs(12)
    extra = {"rdpo": {"rdpo_alpha": 0.01}, "dpop": {"dpop_lambda": 5.0}}
    for name in available_objectives():
        a_w, a_l, loss = _coef(name, x, **extra.get(name, {}))
        assert a_w.shape == a_l.shape == loss.shape == (B,)
        assert torch.isfinite(torch.stack([a_w, a_l, loss])).all(), name


def test_user_registration_and_callable():
    @register_objective("test_scaled_margin", needs_ref=False, defaults={"k": 2.0})
    def scaled_margin(chosen_logps, rejected_logps, *, k, **_):
        return -k * (chosen_logps - rejected_logps)

    x = _pairs(13)
    a_w, a_l, _ = coefficients("test_scaled_margin", x["chosen_logps"], x["rejected_logps"], k=3.0)
    assert torch.all(a_w == 3.0) and torch.all(a_l == -3.0)
    with pytest.raises(ValueError, match="already registered"):
        register_objective("test_scaled_margin")(scaled_margin)

    def squared(chosen_logps, rejected_logps, *, c=1.0, **_):
        return c * (chosen_logps - rejected_logps) ** 2

    a_w, a_l, _ = coefficients(squared, x["chosen_logps"], x["rejected_logps"], c=0.5)
    torch.testing.assert_close(a_w, -(x["chosen_logps"] - x["rejected_logps"]))
    torch.testing.assert_close(a_l, x["chosen_logps"] - x["rejected_logps"])
    # the loss does not depend on s_l at all: a_l is zero, not an error
    a_w, a_l, _ = coefficients(lambda chosen_logps, rejected_logps, **_: -chosen_logps, x["chosen_logps"],
                               x["rejected_logps"])
    assert torch.all(a_w == 1) and torch.all(a_l == 0)


def test_resolve_objective_forms():
    assert isinstance(resolve_objective("sigmoid"), Objective)
    combo = resolve_objective(["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert isinstance(combo, WeightedObjective) and combo.weights == (1.0, 0.5)
    assert combo.needs_ref and combo.hyper_names == {"beta", "nll_norm"}
    assert resolve_objective(combo) is combo
    assert resolve_objective(["sigmoid", "sft"]).weights == (1.0, 1.0)
    with pytest.raises(ValueError, match="2 objectives"):
        resolve_objective(["sigmoid", "sft"], loss_weights=[1.0])


def test_errors_are_clear():
    x = _pairs(14)
    with pytest.raises(ValueError, match=r"unknown objective 'nope'.*sigmoid"):
        coefficients("nope", x["chosen_logps"], x["rejected_logps"])
    with pytest.raises(ValueError, match=r"'sigmoid' needs reference log-probs: pass ref_chosen_logps"):
        coefficients("sigmoid", x["chosen_logps"], x["rejected_logps"])
    with pytest.raises(ValueError, match=r"'ipo' needs reference log-probs: pass ref_rejected_logps"):
        coefficients("ipo", x["chosen_logps"], x["rejected_logps"], ref_chosen_logps=x["ref_chosen_logps"])
    with pytest.raises(ValueError, match="'simpo' needs response lengths"):
        coefficients("simpo", x["chosen_logps"], x["rejected_logps"])
    with pytest.raises(TypeError, match=r"unknown hyper-parameter\(s\) \['bta'\].*'sigmoid'"):
        _coef("sigmoid", x, bta=0.1)
    with pytest.raises(ValueError, match=r"'rdpo' needs hyper-parameter\(s\) \['rdpo_alpha'\]"):
        _coef("rdpo", x)
    with pytest.raises(ValueError, match="exo_pair needs 0 < label_smoothing"):
        _coef("exo_pair", x, label_smoothing=0.0)
    # a combination names the part that lacks its inputs
    with pytest.raises(ValueError, match="'sigmoid' needs reference"):
        coefficients(["sft", "sigmoid"], x["chosen_logps"], x["rejected_logps"], chosen_lengths=x["chosen_lengths"],
                     rejected_lengths=x["rejected_lengths"])


def test_dil_density_ratio_losses_closed_form():
    """DIL's LSIF, UKL and BCE on r = s̄ - s̄_ref (length-averaged, no β): ∂/∂s carries the 1/|y| factor."""
    x = _pairs(21)
    n_w, n_l = x["chosen_lengths"].double(), x["rejected_lengths"].double()
    r_w = (x["chosen_logps"] - x["ref_chosen_logps"]) / n_w
    r_l = (x["rejected_logps"] - x["ref_rejected_logps"]) / n_l
    a_w, a_l, loss = _coef("dil_lsif", x)
    torch.testing.assert_close(loss, -r_w.exp() + 0.5 * (2 * r_l).exp())
    torch.testing.assert_close(a_w, r_w.exp() / n_w)
    torch.testing.assert_close(a_l, -(2 * r_l).exp() / n_l)
    a_w, a_l, loss = _coef("dil_ukl", x)
    torch.testing.assert_close(loss, -x["chosen_logps"] / n_w + r_l.exp())
    torch.testing.assert_close(a_w, 1 / n_w)
    torch.testing.assert_close(a_l, -r_l.exp() / n_l)
    a_w, a_l, loss = _coef("dil_bce", x)
    torch.testing.assert_close(loss, -F.logsigmoid(r_w) - F.logsigmoid(-r_l))
    torch.testing.assert_close(a_w, torch.sigmoid(-r_w) / n_w)
    torch.testing.assert_close(a_l, -torch.sigmoid(r_l) / n_l)
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        _coef("dil_bce", x, beta=0.1)                       # no β in DIL
