"""Per-pair frame of a training micro-batch measured inside the trainer's own pass (``entangle.schema.TRAIN_PAIRS``).

Torch-free: arrays in, a frame out. The coefficients are those the trainer's own loss put on each sequence
(``coef = ∂L/∂s`` as its backward carried it); written per pair as in ``pair_frame``, ``a = -coef · N`` with N the pairs
of the optimizer step on this process, which undoes the mean over the step's pairs (the micro-batch mean and the
trainer's division by the accumulation steps): for DPO's sigmoid loss ``a_chosen = -a_rejected = βσ(-β·margin)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from entangle.metrics.summary import regime_of
from entangle.schema import TRAIN_PAIRS


def train_pair_frame(*, step: int, micro: int, rank: int, index: ArrayLike, logps: ArrayLike, lengths: ArrayLike,
                     coef: ArrayLike, norm2: ArrayLike, inner: ArrayLike, excluded: ArrayLike, lr: float,
                     pairs_in_step: int) -> pd.DataFrame:
    """One row per pair of one recorded micro-batch (2B sequences: chosen, then rejected).

    Args:
        index: [B] the pairs' rows of the training dataset (-1: not found).
        logps, lengths, coef, norm2: [2B] per sequence; inner: [B] per pair; excluded: [2B] bool (a vanished
            coefficient: its pair's measured columns are NaN and its directions False, with no regime).
        lr: the learning rate of the step (η of the predicted changes, as in ``pair_frame``).
        pairs_in_step: pairs of the optimizer step on this process (all its micro-batches).
    """
    s, n = np.asarray(logps, float), np.asarray(lengths, np.int64)
    c, k, kwl = np.asarray(coef, float), np.asarray(norm2, float), np.asarray(inner, float)
    b = len(kwl)
    out = np.asarray(excluded, bool)
    gone = out[:b] | out[b:]
    a_w, a_l = -c[:b] * pairs_in_step, -c[b:] * pairs_in_step
    unit_w = a_w * k[:b] + a_l * kwl
    unit_l = a_w * kwl + a_l * k[b:]
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = kwl / np.sqrt(k[:b] * k[b:])
        ratio = kwl / np.minimum(k[:b], k[b:])
    rises, falls = (unit_w > 0) & ~gone, (unit_l < 0) & ~gone
    regime = regime_of(rises, falls)
    regime[gone] = None
    frame = pd.DataFrame({
        "step": np.full(b, step), "rank": np.full(b, rank), "micro": np.full(b, micro), "pair": np.arange(b),
        "index": np.asarray(index, np.int64),
        "logp_chosen": s[:b], "logp_rejected": s[b:], "len_chosen": n[:b], "len_rejected": n[b:],
        "norm2_chosen": k[:b], "norm2_rejected": k[b:], "inner": kwl, "cosine": cosine, "ratio": ratio,
        "a_chosen": a_w, "a_rejected": a_l, "pred_dlogp_chosen": lr * unit_w, "pred_dlogp_rejected": lr * unit_l,
        "chosen_rises": rises, "rejected_falls": falls, "regime": regime, "margin": s[:b] - s[b:], "excluded": gone,
    })
    return frame[list(TRAIN_PAIRS.columns)]
