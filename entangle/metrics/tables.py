"""Builders of the run directory's tables (``entangle.schema``) and of the scalars logged beside them: pure functions of measured views,
arrays and frames (the Monitor, ``verify_step`` and checkpoint analysis all use these, so each table is built once).

* :func:`layer_frame` — the ``layers`` table, one row per (pair, layer) of one measured view;
* :func:`update_frame` — the ``updates`` table, one row per sequence: observed against predicted change;
* :func:`summary_scalars` / :func:`update_scalars` — what is logged to the trainer (``entangle/...``), the same
  numbers as the ``summary`` and ``updates`` tables;
* :func:`extreme_pairs` — the most / least entangled pairs of a ``pairs`` table (for token maps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike

from entangle.capture.result import View
from entangle.metrics.agreement import sign_agreement
from entangle.schema import LAYERS

EXTREMES = ("extremes", "most", "least")


def layer_frame(view: View, step: int, pairs: Sequence[int]) -> pd.DataFrame:
    """One row per (pair, layer) of the within-pair entries of each layer's block (``view.layer_pairs()``);
    ``pairs`` [B] are the pair ids written in the ``pair`` column."""
    blocks = view.layer_pairs("layer")
    if not blocks:
        return pd.DataFrame(columns=list(LAYERS.columns))
    B = view.n_pairs
    norm2 = torch.stack([b[0].detach().to(torch.float64).cpu() for b in blocks.values()])   # [layers, 2B]
    inner = torch.stack([b[1].detach().to(torch.float64).cpu() for b in blocks.values()])   # [layers, B]
    n_w, n_l = norm2[:, :B], norm2[:, B:]
    return pd.DataFrame({
        "step": step, "pair": np.tile(np.asarray(pairs), len(blocks)), "layer": np.repeat(list(blocks), B),
        "inner": inner.flatten().numpy(), "norm2_chosen": n_w.flatten().numpy(),
        "norm2_rejected": n_l.flatten().numpy(), "cosine": (inner / (n_w * n_l).sqrt()).flatten().numpy(),
    })


def update_frame(logp_before: ArrayLike, logp_after: ArrayLike, pred_update: ArrayLike,
                 pred_gradient: ArrayLike | None = None, *, pairs: Sequence[int] | None = None,
                 n_pairs: int | None = None, step: int | None = None) -> pd.DataFrame:
    """One row per sequence (2B: chosen, then rejected) of one update: ``logp_before`` / ``logp_after`` (nats),
    ``observed`` = after - before, ``pred_update`` = ``<g_i, Δθ>`` and, when given, ``pred_gradient``.

    ``pairs`` [B] are the pairs' ids (default ``0..B-1``) and ``n_pairs`` the size of the whole probe they come
    from (default B): sequence ids are ``pair`` for chosen and ``n_pairs + pair`` for rejected responses. With
    ``step``, a leading ``step`` column.
    """
    before = np.asarray(logp_before, dtype=np.float64).reshape(-1)
    after = np.asarray(logp_after, dtype=np.float64).reshape(-1)
    b = before.shape[0] // 2
    pair = np.arange(b) if pairs is None else np.asarray(pairs)
    if before.shape[0] != 2 * len(pair) or after.shape != before.shape:
        raise ValueError(f"update_frame: {len(pair)} pairs need {2 * len(pair)} log-probs before and after, got "
                         f"{before.shape[0]} and {after.shape[0]}")
    cols = {} if step is None else {"step": step}
    cols |= {
        "seq": np.concatenate([pair, pair + (len(pair) if n_pairs is None else n_pairs)]),
        "pair": np.concatenate([pair, pair]), "side": ["chosen"] * b + ["rejected"] * b,
        "logp_before": before, "logp_after": after, "observed": after - before,
        "pred_update": np.asarray(pred_update, dtype=np.float64).reshape(-1),
    }
    if pred_gradient is not None:
        cols["pred_gradient"] = np.asarray(pred_gradient, dtype=np.float64).reshape(-1)
    return pd.DataFrame(cols)


def summary_scalars(summary: pd.DataFrame | Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The one row of a ``summary`` table (or that row as a dict) as ``{prefix + column: value}`` (numeric columns,
    ``step`` left out)."""
    row = summary.iloc[0] if isinstance(summary, pd.DataFrame) else summary
    return {prefix + k: float(v) for k, v in row.items() if k != "step" and np.isscalar(v) and np.isreal(v)}


def update_scalars(updates: pd.DataFrame, prefix: str) -> dict[str, float]:
    """``update/sign_agreement`` (:func:`entangle.metrics.agreement.sign_agreement`, the report's number too),
    ``update/observed_mean`` and ``update/pred_mean`` of one step's ``updates`` table."""
    obs, pred = updates["observed"].to_numpy(float), updates["pred_update"].to_numpy(float)
    return {prefix + "update/sign_agreement": sign_agreement(obs, pred, updates["logp_before"].to_numpy(float)),
            prefix + "update/observed_mean": float(obs.mean()), prefix + "update/pred_mean": float(pred.mean())}


def extreme_pairs(pairs: pd.DataFrame, which: str = "extremes") -> list[tuple[int, str]]:
    """``[(pair id, label)]`` of a ``pairs`` table: the highest-cosine pair (``"most entangled"``) and/or the
    lowest (``"least entangled"``); ``which`` is ``"extremes"`` (both), ``"most"`` or ``"least"``."""
    if which not in EXTREMES:
        raise ValueError(f"which must be one of {EXTREMES}, not {which!r}")
    cos = pairs.set_index("pair")["cosine"].astype(float)
    cos = cos[np.isfinite(cos.to_numpy())]
    if cos.empty:
        raise ValueError("no pair has a finite gradient cosine")
    picked = []
    if which in ("extremes", "most"):
        picked.append((int(cos.idxmax()), "most entangled"))
    if which in ("extremes", "least") and not (picked and int(cos.idxmin()) == picked[0][0]):
        picked.append((int(cos.idxmin()), "least entangled"))
    return picked


def concat_frames(frames: Sequence[pd.DataFrame | None], key: str) -> pd.DataFrame:
    """Non-empty frames stacked and stably sorted by ``key`` (e.g. the parts of several ranks)."""
    frames = [f for f in frames if f is not None and not f.empty]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True).sort_values(key, kind="stable").reset_index(drop=True)
