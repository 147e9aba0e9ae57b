"""The toolkit checking itself: first-order predictions against one real optimizer step (THEORY §3-§5)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pandas as pd
import torch

from .capture.engine import measurement_mode
from .capture.logprobs import response_lengths, sequence_logps
from .capture.measure import sequence_gram, update_dot
from .capture.params import ParamSpec, parameters_at, select_params, unwrap_model
from .metrics import coefficients, resolve_objective
from .metrics.agreement import moved, sign_agreement
from .metrics.tables import update_frame


def _pair_args(logps: torch.Tensor, batch, ref_logps):
    b = logps.shape[0] // 2
    lengths = response_lengths(batch).to(logps.device)
    args = {"chosen_lengths": lengths[:b], "rejected_lengths": lengths[b:]}
    if ref_logps is not None:
        args.update(ref_chosen_logps=ref_logps[:b], ref_rejected_logps=ref_logps[b:])
    return logps[:b], logps[b:], args


def make_step_fn(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                 objective="sigmoid", ref_logps: torch.Tensor | None = None, loss_weights=None,
                 **hyper) -> Callable[[], None]:
    """A closure doing one real training step: mean over pairs of ``objective`` on ``batch``, then ``optimizer.step()``.

    ``ref_logps`` [2B] defaults to the policy's own log-probs now (a DPO run's first step).
    """
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = sequence_logps(model, batch).detach()

    obj = resolve_objective(objective, loss_weights)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logps = sequence_logps(model, batch)
        w, l, args = _pair_args(logps, batch, ref_logps.to(logps.dtype))
        obj(w, l, **args, **hyper).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.ref_logps = ref_logps
    return step


def verify_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], step_fn: Callable[[], None], *,
                lr: float | None = None, objective="sigmoid", ref_logps: torch.Tensor | None = None,
                params: ParamSpec = None, loss_weights=None, **hyper) -> pd.DataFrame:
    """Measure log-probs before and after one real step and compare with the first-order predictions.

    Columns, one row per sequence: ``seq``, ``pair``, ``side``, ``logp_before``, ``logp_after``,
    ``observed`` (after - before, nats), ``pred_update`` (``<g_i, theta_after - theta_before>``: exact
    to first order for ANY optimizer) and, when ``lr`` is given, ``pred_gradient`` (``lr * (K c)_i``,
    the plain-gradient-descent prediction for ``objective``, THEORY §4).

    ``step_fn()`` must perform the step (e.g. :func:`make_step_fn`). Parameters are compared over
    ``params``; the model is left at its post-step parameters.
    """
    inner = unwrap_model(model)
    named = select_params(inner, params)
    before = {n: p.detach().clone() for n, p in named}
    gram = sequence_gram(inner, batch, params=params) if lr is not None else None
    step_fn()
    delta = {n: p.detach() - before[n] for n, p in named}
    with measurement_mode(inner, named), torch.no_grad():
        logp_after = sequence_logps(inner, batch).to(torch.float64)
    with parameters_at(named, before):                       # predictions are taken at theta_before
        pred_update, logp_before = update_dot(inner, batch, delta, params=params)
    b = logp_before.shape[0] // 2
    pred_gradient = None
    if gram is not None:
        w, l, args = _pair_args(gram.logps, batch, None if ref_logps is None else ref_logps.to(torch.float64))
        if ref_logps is None and getattr(step_fn, "ref_logps", None) is not None:
            ref = step_fn.ref_logps.to(torch.float64)
            args.update(ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:])
        a_w, a_l, _ = coefficients(objective, w, l, loss_weights=loss_weights, **args, **hyper)
        c = torch.cat([a_w, a_l]).to(gram.matrix) / b
        pred_gradient = (lr * (gram.matrix @ c)).cpu().numpy()
    return update_frame(logp_before.cpu().numpy(), logp_after.cpu().numpy(), pred_update.cpu().numpy(),
                        pred_gradient)


def agreement(frame: pd.DataFrame, pred: str = "pred_update") -> dict[str, float]:
    """How well a prediction column matches ``observed``.

    Only the sequences that moved (``entangle.metrics.agreement.moved``: ``|observed|`` above the noise floor
    1e-6 * max(1, |logp_before|)) are compared; the others are counted in ``n_excluded``. Returns ``n``,
    ``n_excluded``, ``median_rel_err`` (median of ``|pred - observed| / |observed|``) and ``sign_agreement``
    (``entangle.metrics.agreement.sign_agreement``, the number the monitor logs and the report draws).
    """
    keep = moved(frame["observed"], frame["logp_before"])
    kept = frame[keep]
    rel = (kept[pred] - kept["observed"]).abs() / kept["observed"].abs()
    return {"n": int(keep.sum()), "n_excluded": int((~keep).sum()),
            "median_rel_err": float(rel.median()) if len(kept) else float("nan"),
            "sign_agreement": sign_agreement(frame["observed"], frame[pred], frame["logp_before"])}
