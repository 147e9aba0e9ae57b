"""Per-step summary of per-pair frames (THEORY.md §3, §4, §8). Torch-free: frames in, frames out.

:func:`summarize` reduces ``pair_frame`` frames (``entangle.schema.PAIRS``) to the ``summary`` table
(``entangle.schema.SUMMARY``); :func:`regime_of` names the regime of each pair from the signs of its predicted
changes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from entangle.schema import REGIMES, SUMMARY_QUANTITIES

# numeric columns that must be finite for a pair to enter the statistics of ``summarize``
_STAT_COLUMNS = (
    "logp_chosen", "logp_rejected", "norm2_chosen", "norm2_rejected", "inner", "cosine", "ratio",
    "a_chosen", "a_rejected", "pred_dlogp_chosen", "pred_dlogp_rejected", "batch_dlogp_chosen",
    "batch_dlogp_rejected", "ref_logp_chosen", "ref_logp_rejected", "loss",
)


def pair_changes(a_w: ArrayLike, a_l: ArrayLike, norm2_w: ArrayLike, norm2_l: ArrayLike, inner: ArrayLike
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the first-order change of its chosen and rejected log-probs under a unit step on its own loss
    (THEORY.md §3): ``a_w ||g_w||² + a_l <g_w, g_l>`` and ``a_w <g_w, g_l> + a_l ||g_l||²``."""
    a_w, a_l, k_ww, k_ll, k_wl = (np.asarray(x, dtype=float) for x in (a_w, a_l, norm2_w, norm2_l, inner))
    return a_w * k_ww + a_l * k_wl, a_w * k_wl + a_l * k_ll


def pair_geometry(norm2_w: ArrayLike, norm2_l: ArrayLike, inner: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, ``cosine = <g_w, g_l> / (||g_w|| ||g_l||)`` and the entanglement ratio
    ``<g_w, g_l> / min(||g_w||², ||g_l||²)`` (THEORY.md §3, both norms); NaN/inf for a zero gradient."""
    k_ww, k_ll, k_wl = (np.asarray(x, dtype=float) for x in (norm2_w, norm2_l, inner))
    with np.errstate(invalid="ignore", divide="ignore"):
        return k_wl / np.sqrt(k_ww * k_ll), k_wl / np.minimum(k_ww, k_ll)


def regime_of(chosen_rises: np.ndarray, rejected_falls: np.ndarray) -> np.ndarray:
    """Regime name per pair from the signs of the predicted changes (THEORY.md §3)."""
    names = np.array(["chosen_falls_rejected_rises", "both_fall", "both_rise", "ideal"], dtype=object)
    return names[2 * np.asarray(chosen_rises, dtype=int) + np.asarray(rejected_falls, dtype=int)]


def summarize(frame: pd.DataFrame, pref_col: str | None = None, beta: float | None = None) -> pd.DataFrame:
    """One row per ``step`` (one row in all if there is no ``step`` column) of a ``pair_frame`` frame.

    Pairs with a non-finite value in any numeric pair column (or in ``pref_col``) are excluded from every
    statistic and counted in ``n_excluded``; ``n_pairs`` counts all rows.

    Columns: step (if present), n_pairs, n_excluded;
        share_<regime> for the per-pair regimes (they sum to 1) and batch_share_<regime> from the batch-view signs
        (when the frame has them);
        <q>_mean, <q>_q10, <q>_q50, <q>_q90 for q in cosine, ratio, inner, norm2_chosen, norm2_rejected;
        loss_mean (when the frame has a loss column); ranking_accuracy = share with logp_chosen > logp_rejected;
        with reference columns: ranking_accuracy_ref_adjusted (share with (s_w - s_w^ref) - (s_l - s_l^ref) > 0)
        and ref_ranking_accuracy (share with s_w^ref > s_l^ref);
        in every ranking accuracy a tie (a zero margin: e.g. every pair's implicit reward while the policy still
        equals its reference) counts one half, as a coin flip would rank it, not as a wrong ranking;
        with ``pref_col`` (probability p that the chosen response is preferred): idealized_ranking_accuracy, the
        share whose DPO optimum ranks chosen first, i.e. s_w^ref - s_l^ref + (1/β) log(p / (1 - p)) > 0
        (THEORY.md §8), and ranking_accuracy_gap = idealized_ranking_accuracy - ranking_accuracy.
        ``beta`` defaults to the ``beta`` the frame was built with (``frame.attrs``).
    """
    if pref_col is not None:
        if pref_col not in frame:
            raise ValueError(f"preference column {pref_col!r} not in frame; columns: {list(frame.columns)}")
        if "ref_logp_chosen" not in frame:
            raise ValueError("idealized ranking accuracy needs reference log-probs (ref_logp_chosen/ref_logp_rejected)")
        beta = beta if beta is not None else frame.attrs.get("hyper", {}).get("beta")
        if beta is None:
            raise ValueError("idealized ranking accuracy needs beta: pass summarize(..., beta=...)")
        p = frame[pref_col].to_numpy(dtype=float)
        outside = (p < 0) | (p > 1)
        if outside.any():
            raise ValueError(f"{pref_col!r} must be a probability in [0, 1]; pair(s) "
                             f"{frame['pair'].to_numpy()[outside].tolist()} are not")
    steps = frame["step"].to_numpy() if "step" in frame else None
    if steps is None:
        groups = [(None, frame)]
    elif len(steps) and (steps == steps[0]).all():       # one step (a callback's): no grouping
        groups = [(steps[0], frame)]
    else:
        groups = frame.groupby("step", sort=True, dropna=False)
    rows = [({"step": k} if steps is not None else {}) | _summarize_step(_Columns(g), len(g), pref_col, beta)
            for k, g in groups]
    return pd.DataFrame(rows)


def summary_row(step: int, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``summarize``'s row of one step's pairs given as the arrays of their columns (a frame's, before the frame is
    built, as a callback has them at every step), as a dict: the same values, without pandas' per-column access
    (~50 µs a column) or a frame (a callback holds its steps' rows until it writes them)."""
    n = len(next(iter(columns.values())))
    return {"step": step} | _summarize_step(_Arrays(columns), n, None, None)


class _Columns:
    """A frame's columns as arrays, read one by one (selecting them as one frame first costs more)."""

    def __init__(self, columns: pd.DataFrame | Mapping[str, ArrayLike]):
        self.columns = columns

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def array(self, name: str, dtype) -> np.ndarray:
        return self.columns[name].to_numpy(dtype=dtype)


class _Arrays(_Columns):
    """Columns given as arrays already."""

    def array(self, name: str, dtype) -> np.ndarray:
        return np.asarray(self.columns[name], dtype=dtype)


def _summarize_step(g: _Columns, size: int, pref_col: str | None, beta: float | None) -> dict[str, float]:
    check = [c for c in _STAT_COLUMNS if c in g] + ([pref_col] if pref_col else [])
    ok = np.ones(size, dtype=bool)
    for c in check:
        ok &= np.isfinite(g.array(c, float))

    def col(name: str, dtype=float) -> np.ndarray:           # the included pairs' values
        return g.array(name, dtype)[ok]

    n = int(ok.sum())
    row: dict[str, float] = {"n_pairs": size, "n_excluded": size - n}
    regime = col("regime", object)
    for r in REGIMES:
        row[f"share_{r}"] = float((regime == r).mean()) if n else np.nan
    if "batch_chosen_rises" in g:        # a training pass's pairs (train_pairs) have no batch view
        batch_regime = regime_of(col("batch_chosen_rises", bool), col("batch_rejected_falls", bool))
        for r in REGIMES:
            row[f"batch_share_{r}"] = float((batch_regime == r).mean()) if n else np.nan
    x = np.stack([col(q) for q in SUMMARY_QUANTITIES])            # [quantities, pairs]: one quantile call
    means = x.mean(1) if n else np.full(len(x), np.nan)
    qs = np.quantile(x, (0.1, 0.5, 0.9), axis=1) if n else np.full((3, len(x)), np.nan)
    for i, q in enumerate(SUMMARY_QUANTITIES):
        row[f"{q}_mean"] = float(means[i])
        for p, v in zip((10, 50, 90), qs[:, i], strict=True):
            row[f"{q}_q{p}"] = float(v)
    if "loss" in g:
        row["loss_mean"] = float(col("loss").mean()) if n else np.nan

    margin = col("logp_chosen") - col("logp_rejected")
    row["ranking_accuracy"] = ranked_share(margin)
    if "ref_logp_chosen" in g:
        ref_gap = col("ref_logp_chosen") - col("ref_logp_rejected")
        row["ranking_accuracy_ref_adjusted"] = ranked_share(margin - ref_gap)
        row["ref_ranking_accuracy"] = ranked_share(ref_gap)
        if pref_col is not None:
            p = col(pref_col)
            with np.errstate(divide="ignore"):
                ideal_margin = ref_gap + (np.log(p) - np.log1p(-p)) / beta
            row["idealized_ranking_accuracy"] = ranked_share(ideal_margin)
            row["ranking_accuracy_gap"] = row["idealized_ranking_accuracy"] - row["ranking_accuracy"]
    return row


def ranked_share(margin: ArrayLike) -> float:
    """Share of the pairs ranked right by ``margin`` (chosen minus rejected): a positive margin counts 1, a tie
    (zero) one half, a negative one 0; NaN for no pair."""
    m = np.asarray(margin, dtype=float)
    return float(((m > 0) + 0.5 * (m == 0)).mean()) if len(m) else np.nan
