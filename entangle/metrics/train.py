"""Per-pair columns of the training micro-batches measured inside the trainer's own pass (``entangle.schema.TRAIN_PAIRS``).

Torch-free: arrays in, arrays out (a frame's columns). The coefficients are those the trainer's own loss put on each sequence
(``coef = ∂L/∂s`` as its backward carried it); written per pair as in ``pair_frame``, ``a = -coef · N`` with N the pairs
of the optimizer step on this process, which undoes the mean over the step's pairs (the micro-batch mean and the
trainer's division by the accumulation steps): for DPO's sigmoid loss ``a_chosen = -a_rejected = βσ(-β·margin)``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from entangle.metrics.summary import pair_changes, pair_geometry, regime_of
from entangle.schema import TRAIN_PAIRS


def train_pair_columns(*, step: int, rank: int, micro: ArrayLike, pair: ArrayLike, index: ArrayLike,
                       logps: tuple[ArrayLike, ArrayLike], lengths: tuple[ArrayLike, ArrayLike],
                       coef: tuple[ArrayLike, ArrayLike], norm2: tuple[ArrayLike, ArrayLike], inner: ArrayLike,
                       excluded: ArrayLike, lr: float, pairs_in_step: int) -> dict[str, np.ndarray]:
    """The ``train_pairs`` columns of one optimizer step's measured pairs, as arrays in the schema's order.

    Args:
        micro, pair, index: [P] per pair: its micro-batch, its place in it, its row of the training dataset (-1: not
            found).
        logps, lengths, coef, norm2: (chosen [P], rejected [P]) per sequence; inner: [P] per pair.
        excluded: [P] bool, a pair with a vanished coefficient (its measured columns are NaN, its directions False,
            with no regime).
        lr: the learning rate of the step (η of the predicted changes, as in ``pair_frame``).
        pairs_in_step: pairs of the optimizer step on this process (all its micro-batches).
    """
    (s_w, s_l), (n_w, n_l) = (np.asarray(x, float) for x in logps), (np.asarray(x, np.int64) for x in lengths)
    c_w, c_l = (np.asarray(x, float) for x in coef)
    k_w, k_l = (np.asarray(x, float) for x in norm2)
    kwl, gone = np.asarray(inner, float), np.asarray(excluded, bool)
    a_w, a_l = -c_w * pairs_in_step, -c_l * pairs_in_step
    unit_w, unit_l = pair_changes(a_w, a_l, k_w, k_l, kwl)
    cosine, ratio = pair_geometry(k_w, k_l, kwl)
    rises, falls = (unit_w > 0) & ~gone, (unit_l < 0) & ~gone
    regime = regime_of(rises, falls)
    regime[gone] = None
    p = len(kwl)
    columns = {
        "step": np.full(p, step), "rank": np.full(p, rank), "micro": np.asarray(micro, np.int64),
        "pair": np.asarray(pair, np.int64), "index": np.asarray(index, np.int64),
        "logp_chosen": s_w, "logp_rejected": s_l, "len_chosen": n_w, "len_rejected": n_l,
        "norm2_chosen": k_w, "norm2_rejected": k_l, "inner": kwl, "cosine": cosine, "ratio": ratio,
        "a_chosen": a_w, "a_rejected": a_l, "pred_dlogp_chosen": lr * unit_w, "pred_dlogp_rejected": lr * unit_l,
        "chosen_rises": rises, "rejected_falls": falls, "regime": regime, "margin": s_w - s_l, "excluded": gone,
    }
    return {name: columns[name] for name in TRAIN_PAIRS.columns}
