"""Per-pair entanglement frame (THEORY.md §3, §4).

``pair_frame`` turns one measured view, a ``GramResult`` or a ``PairStats`` (2B sequences: all chosen, then all
rejected) into a tidy frame, one row per pair: log-probs, gradient norms and inner product, the objective's
coefficients, and the first-order change of each log-prob under one gradient step, seen per pair (§3) and across the
minibatch (§4). Its columns are stated in :mod:`entangle.schema`; :func:`entangle.metrics.summary.summarize`
(re-exported here) reduces such frames to one row per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from entangle.capture.result import View
from entangle.metrics.objectives import ObjectiveSpec, coefficients, resolve_objective
from entangle.metrics.summary import pair_changes, pair_geometry, regime_of, summarize
from entangle.schema import PAIR_COLUMNS, REGIMES

__all__ = ["PAIR_COLUMNS", "REGIMES", "batch_weights", "pair_frame", "regime_of", "summarize"]


def pair_frame(
    gram: View,
    objective: ObjectiveSpec = "sigmoid",
    ref_logps: torch.Tensor | None = None,
    *,
    step: int | None = None,
    lr: float = 1.0,
    loss_weights: Sequence[float] | None = None,
    **hyper: Any,
) -> pd.DataFrame:
    """One row per pair of the entanglement quantities of one training step.

    Args:
        gram: a ``GramResult`` (Gram matrix K [2B, 2B]) or ``PairStats`` (its within-pair entries and K c,
            measured for this objective's ``batch_weights``), with log-probs s [2B] and lengths [2B] of B pairs
            (pair k = rows k and B + k).
        objective: objective name, callable or list (with ``loss_weights``), see ``objectives.resolve_objective``.
        ref_logps: [2B] reference log-probs in the same order, or None (reference-free objectives).
        step: training step, stored in a ``step`` column when given.
        lr: learning rate η ≥ 0 multiplying every predicted change (1.0 = per unit learning rate). The directions
            (``*_rises``, ``*_falls``, ``regime``) are those of a gradient step, whatever η: with η = 0 (the end of a
            schedule) the predicted changes are 0 and the directions still say where a step would go.
        hyper: keywords the objective declares (``beta=0.1``) are hyper-parameters; any other keyword with one
            value per pair (list, array, tensor, Series of length B, e.g. ``pref_prob=[...]``) becomes a column.

    Columns (per pair k; w = chosen, l = rejected; log-probs in nats, gradients of summed log-probs):
        pair, logp_chosen, logp_rejected, len_chosen, len_rejected;
        norm2_chosen = ||g_w||², norm2_rejected = ||g_l||², inner = <g_w, g_l>, cosine = cos(g_w, g_l),
        ratio = <g_w, g_l> / min(||g_w||², ||g_l||²)  (THEORY.md §3, both norms);
        a_chosen, a_rejected: per-pair coefficients -dl/ds (not divided by B), loss: per-pair loss;
        pred_dlogp_chosen = η (a_w ||g_w||² + a_l <g_w, g_l>), pred_dlogp_rejected = η (a_w <g_w, g_l> + a_l ||g_l||²)
            (§3, this pair alone);
        batch_dlogp_chosen/rejected = η (K c), c = cat(a_w, a_l) / B (§4, the batch-mean step);
        chosen_rises, rejected_falls (per-pair view), batch_chosen_rises, batch_rejected_falls (batch view);
        regime (per-pair view): ideal | both_rise | both_fall | chosen_falls_rejected_rises;
        margin = logp_chosen - logp_rejected; ref_logp_chosen/ref_logp_rejected when ``ref_logps`` is given;
        step when given; then the extra per-pair columns.

    Non-finite log-probs, reference log-probs or Gram entries raise, naming the pairs. Quantities that come out
    non-finite from finite inputs (a zero gradient makes ``cosine`` NaN) are kept; ``summarize`` counts them.
    """
    norm2, k_wl, s, n, B = _validated(gram)
    ref = _validated_ref(ref_logps, B)
    obj = resolve_objective(objective, loss_weights)
    hyper, extra = _split_hyper(hyper, obj.hyper_names, B, obj.name)

    a_w, a_l, loss = _pair_coefficients(obj, s, n, ref, hyper)
    k_ww, k_ll = norm2[:B], norm2[B:]

    # §3: one pair alone, Δs ≈ η [[K_ww, K_wl], [K_wl, K_ll]] (a_w, a_l)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite learning rate >= 0, got {lr}")
    unit_w, unit_l = pair_changes(a_w, a_l, k_ww, k_ll, k_wl)
    # §4: the whole minibatch, Δs ≈ η K c with c the coefficients of the batch-mean loss
    c = torch.cat([a_w, a_l]) / B
    unit_batch = gram.batch_view(c)
    bad = (~torch.isfinite(unit_batch)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"non-finite Gram entries involving pair(s) {_pairs_of_rows(bad, B)} (rows {bad.tolist()})")
    pred_w, pred_l, batch = lr * unit_w, lr * unit_l, lr * unit_batch

    cosine, ratio = pair_geometry(k_ww, k_ll, k_wl)  # NaN/inf for a zero gradient: counted by summarize

    cols: dict[str, Any] = {}
    if step is not None:
        cols["step"] = np.full(B, step)
    chosen_rises, rejected_falls = unit_w > 0, unit_l < 0
    cols |= {
        "pair": np.arange(B),
        "logp_chosen": s[:B], "logp_rejected": s[B:],
        "len_chosen": n[:B], "len_rejected": n[B:],
        "norm2_chosen": k_ww, "norm2_rejected": k_ll, "inner": k_wl, "cosine": cosine, "ratio": ratio,
        "a_chosen": a_w, "a_rejected": a_l,
        "pred_dlogp_chosen": pred_w, "pred_dlogp_rejected": pred_l,
        "batch_dlogp_chosen": batch[:B], "batch_dlogp_rejected": batch[B:],
        "chosen_rises": chosen_rises, "rejected_falls": rejected_falls,
        "batch_chosen_rises": (unit_batch[:B] > 0).numpy(), "batch_rejected_falls": (unit_batch[B:] < 0).numpy(),
        "regime": regime_of(chosen_rises, rejected_falls),
        "margin": s[:B] - s[B:],
    }
    if ref is not None:
        cols |= {"ref_logp_chosen": ref[:B], "ref_logp_rejected": ref[B:]}
    cols["loss"] = loss
    cols |= extra
    frame = pd.DataFrame({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in cols.items()})
    # a regime needs both predictions; a non-finite one has none
    frame.loc[~np.isfinite(frame[["pred_dlogp_chosen", "pred_dlogp_rejected"]]).all(axis=1), "regime"] = None
    frame.attrs["objective"] = obj.name
    frame.attrs["hyper"] = {**obj.defaults, **hyper}
    return frame


def batch_weights(objective: ObjectiveSpec, logps: torch.Tensor, lengths: torch.Tensor,
                  ref_logps: torch.Tensor | None = None, loss_weights: Sequence[float] | None = None,
                  **hyper: Any) -> torch.Tensor:
    """c = cat(a_w, a_l) / B [2B] float64: the coefficients of the batch-mean loss, as ``pair_frame`` uses them in
    ``batch_dlogp = η K c``; pass it (or a function of the log-probs returning it) as
    ``measure(..., structure="pairs", weights=...)``."""
    s = torch.as_tensor(logps).detach().to(torch.float64).cpu()
    n = torch.as_tensor(lengths).detach().cpu()
    B = s.shape[0] // 2
    ref = _validated_ref(ref_logps, B)
    obj = resolve_objective(objective, loss_weights)
    hyper = _split_hyper(hyper, obj.hyper_names, B, obj.name)[0]      # per-pair extra columns play no part
    a_w, a_l, _ = _pair_coefficients(obj, s, n, ref, hyper)
    return torch.cat([a_w, a_l]) / B


def _pair_coefficients(obj, s: torch.Tensor, n: torch.Tensor, ref: torch.Tensor | None, hyper: dict[str, Any]):
    """(a_w, a_l, loss) [B] of 2B log-probs ``s`` (chosen, then rejected), lengths ``n`` and reference ``ref``."""
    B = s.shape[0] // 2
    return coefficients(
        obj, s[:B], s[B:],
        ref_chosen_logps=None if ref is None else ref[:B], ref_rejected_logps=None if ref is None else ref[B:],
        chosen_lengths=n[:B], rejected_lengths=n[B:], **hyper,
    )


def _pairs_of_rows(rows: torch.Tensor, B: int) -> list[int]:
    return sorted({int(r) % B for r in rows})


def _validated(gram: View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Squared norms [2B], within-pair inner products [B], log-probs and lengths as float64/int64, checked."""
    norm2, inner = (torch.as_tensor(t).detach().to(torch.float64).cpu() for t in gram.within_pair())
    s = torch.as_tensor(gram.logps).detach().to(torch.float64).cpu()
    n = torch.as_tensor(gram.lengths).detach().to(torch.int64).cpu()
    N = norm2.shape[0]
    if norm2.ndim != 1 or N % 2 or inner.shape != (N // 2,):
        raise ValueError(f"a view of 2B sequences has 2B squared norms and B inner products; got "
                         f"{tuple(norm2.shape)} and {tuple(inner.shape)}")
    if s.shape != (N,) or n.shape != (N,):
        raise ValueError(f"logps {tuple(s.shape)} and lengths {tuple(n.shape)} must be [{N}] to match the Gram view")
    B = N // 2
    bad = (~torch.isfinite(s)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"non-finite log-probs for pair(s) {_pairs_of_rows(bad, B)} (rows {bad.tolist()})")
    bad = torch.cat([(~torch.isfinite(norm2)).nonzero().flatten(), (~torch.isfinite(inner)).nonzero().flatten()])
    if len(bad):
        raise ValueError(f"non-finite Gram entries involving pair(s) {_pairs_of_rows(bad, B)}")
    return norm2, inner, s, n, B


def _validated_ref(ref_logps: torch.Tensor | None, B: int) -> torch.Tensor | None:
    if ref_logps is None:
        return None
    ref = torch.as_tensor(ref_logps).detach().to(torch.float64).cpu().flatten()
    if ref.shape[0] != 2 * B:
        raise ValueError(f"ref_logps has {ref.shape[0]} entries but the Gram matrix has {2 * B} sequences ({B} pairs)")
    bad = (~torch.isfinite(ref)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"non-finite reference log-probs for pair(s) {_pairs_of_rows(bad, B)} (rows {bad.tolist()})")
    return ref


def _split_hyper(kwargs: dict[str, Any], hyper_names: frozenset[str], B: int, name: str):
    """Separate the objective's hyper-parameters from extra per-pair columns."""
    hyper, extra = {}, {}
    for key, value in kwargs.items():
        if key in hyper_names:
            hyper[key] = value
        elif key in PAIR_COLUMNS or key in ("step", "ref_logp_chosen", "ref_logp_rejected"):
            raise ValueError(f"extra column {key!r} would overwrite a pair_frame column")
        elif np.ndim(values := _as_array(value)) == 1:
            if len(values) != B:
                raise ValueError(f"extra column {key!r} has {len(values)} values for {B} pairs")
            extra[key] = values
        else:
            raise TypeError(f"{key!r} is neither a hyper-parameter of objective {name!r} "
                            f"(it accepts {sorted(hyper_names) or 'none'}) nor a per-pair column of length {B}")
    return hyper, extra


def _as_array(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
