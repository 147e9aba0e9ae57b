"""Sign agreement of predicted and observed log-prob changes: the one definition the monitor, ``verify`` and the
report share (THEORY.md §5). Torch-free: numpy arrays in, numbers out.

A sequence *moved* when its observed change exceeds the noise floor ``NOISE_FLOOR * max(1, |logp_before|)``, the
round-off of a summed log-prob recomputed after a step; sequences that did not move carry no sign to agree with.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

NOISE_FLOOR = 1e-6


def moved(observed: ArrayLike, logp_before: ArrayLike) -> np.ndarray:
    """Boolean mask of the sequences whose ``|observed| > NOISE_FLOOR * max(1, |logp_before|)`` (NaN: not moved)."""
    obs, before = _float_arrays(observed=observed, logp_before=logp_before)
    with np.errstate(invalid="ignore"):
        return np.abs(obs) > NOISE_FLOOR * np.maximum(1.0, np.abs(before))


def sign_agreement(observed: ArrayLike, predicted: ArrayLike, logp_before: ArrayLike) -> float:
    """Share of the sequences that moved (see :func:`moved`) and have a finite prediction whose predicted change
    has the sign of the observed one; NaN when there is none."""
    obs, pred, _ = _float_arrays(observed=observed, predicted=predicted, logp_before=logp_before)
    keep = moved(obs, logp_before) & np.isfinite(pred)
    return float((np.sign(pred[keep]) == np.sign(obs[keep])).mean()) if keep.any() else float("nan")


def _float_arrays(**arrays: ArrayLike) -> tuple[np.ndarray, ...]:
    """The arrays as 1-d float64, after checking they have one length (the error names them)."""
    out = {name: np.asarray(a, dtype=np.float64).reshape(-1) for name, a in arrays.items()}
    if len({len(a) for a in out.values()}) > 1:
        sizes = ", ".join(f"{name} has {len(a)}" for name, a in out.items())
        raise ValueError(f"sign agreement needs one value per sequence in every array: {sizes}")
    return tuple(out.values())
