"""``entangle filter``: a training dataset without, or down-weighting, its most entangled pairs (torch-free).

The ranking is measured, not guessed: the run's ``train_pairs`` table (``EntanglementCallback(train_every=k)``)
gives each dataset row's gradient cosine cos(g_w, g_l) at the steps it was trained on, and
:func:`entangle.metrics.dataset.dataset_view` averages it (``cosine_mean``, the entanglement score).

- drop: the ⌊fraction · n⌋ rows with the highest score among the n rows measured (ties: the lower index goes
  first), the fraction taken exactly as written in decimal (0.1 of 25 rows drops 2);
- weight: a ``weight`` column w = 1 − max(cosine_mean, 0): 1 for a pair whose two gradients are orthogonal or
  opposed, falling to 0 as they become parallel.

Rows never measured (not reached by the run, or seen only with a vanished loss coefficient) are kept, with
weight 1. The ``index`` of ``train_pairs`` is the row of ``trainer.train_dataset``: the rows given here must be
that dataset's, in its order.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from entangle.metrics.dataset import check_rows_cover, dataset_view
from entangle.runio import read_table
from entangle.schema import TRAIN_PAIRS

SCORE = "cosine_mean"
OUTPUT_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Filtered:
    """What :func:`filter_pairs` did: the rows to write and the counts to report.

    ``n_measured`` rows had a score, ``n_unmeasured`` did not (kept, weight 1); ``dropped`` are the indices
    dropped, most entangled first; ``threshold`` is the lowest score dropped (NaN when none was); ``weights``
    holds each row's weight with ``weight=True`` (None otherwise).
    """

    rows: list[dict]
    n_measured: int
    n_unmeasured: int
    dropped: list[int]
    threshold: float
    weights: np.ndarray | None = None


def read_train_pairs(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The ``train_pairs`` table of a run directory.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: it has no ``train_pairs`` table (the run did not measure its training pairs).
    """
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    frame = read_table(run_dir, TRAIN_PAIRS.name)
    if frame.empty:
        raise ValueError(f"run directory {str(run_dir)!r} has no train_pairs table: measure the training pairs with "
                         "EntanglementCallback(train_every=k)")
    return frame


def read_dataset(path: str | os.PathLike) -> list[dict]:
    """Every row of the preference dataset at ``path`` (any file :func:`entangle.load_pairs` reads), in order.

    No row is skipped, so that row numbers stay those of the dataset the trainer was given.

    Raises:
        ValueError: an HH-RLHF row that ``load_pairs`` cannot split into prompt and responses (it would skip it),
            or any row ``load_pairs`` rejects; the message names the rows.
    """
    from entangle.data import PairError, load_pairs

    try:
        return load_pairs(path, on_mismatch="error")
    except PairError as err:
        raise PairError(f"{path}: {err}; row numbers must stay those of trainer.train_dataset, so no row can be "
                        "skipped: fix or drop these rows, train on that file and pass it") from None


def filter_pairs(
    rows: Sequence[Mapping[str, Any]],
    train_pairs: pd.DataFrame,
    *,
    drop_top: float | None = None,
    weight: bool = False,
) -> Filtered:
    """``rows`` (the rows of ``trainer.train_dataset``, in order) without their ``drop_top`` fraction of most
    entangled measured rows, or with a ``weight`` column (``weight=True``); see the module docstring.

    Raises:
        ValueError: not exactly one of ``drop_top`` and ``weight``; ``drop_top`` outside (0, 1]; ``train_pairs``
            names no dataset row (every index -1); ``rows`` has fewer rows than the largest index.
    """
    if (drop_top is None) == (not weight):
        raise ValueError("give exactly one of drop_top (a fraction of the measured rows) and weight=True")
    if drop_top is not None and not 0 < drop_top <= 1:
        raise ValueError(f"drop_top must be a fraction in (0, 1], not {drop_top!r}")
    view = dataset_view(train_pairs)
    if view.empty:
        raise ValueError("the train_pairs table names no dataset row (every index is -1): the trainer's dataset "
                         "rows could not be told apart")
    check_rows_cover(view, len(rows), "the dataset")
    score = np.full(len(rows), np.nan)
    score[view["index"].to_numpy(dtype=int)] = view[SCORE].to_numpy(dtype=float)
    measured = np.isfinite(score)
    n_measured = int(measured.sum())
    if weight:
        weights = np.where(measured, 1.0 - np.clip(score, 0.0, None), 1.0)
        out = [{**row, "weight": float(w)} for row, w in zip(rows, weights, strict=True)]
        return Filtered(out, n_measured, len(rows) - n_measured, [], math.nan, weights)
    n_drop = math.floor(Fraction(str(drop_top)) * n_measured)
    ranked = np.flatnonzero(measured)
    ranked = ranked[np.lexsort((ranked, -score[ranked]))]      # highest score first, ties: lower index first
    dropped = ranked[:n_drop]
    keep = np.ones(len(rows), dtype=bool)
    keep[dropped] = False
    out = [dict(row) for row, k in zip(rows, keep, strict=True) if k]
    return Filtered(out, n_measured, len(rows) - n_measured, dropped.tolist(),
                    float(score[dropped].min()) if n_drop else math.nan)


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if its suffix is one of :data:`OUTPUT_SUFFIXES`; else ``ValueError`` naming it."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output file {str(path)!r}: unknown suffix {path.suffix!r}; expected "
                         f"{' or '.join(OUTPUT_SUFFIXES)}")
    return path


def write_pairs(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` as JSON Lines (``.jsonl``) or Parquet (``.parquet``), columns as they are (a TRL-ready
    dataset when they hold prompt/chosen/rejected); return the path."""
    path = check_output_path(path)
    if path.suffix.lower() == ".parquet":
        pd.DataFrame(list(rows)).to_parquet(path, index=False)
    else:
        with path.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False, default=_plain) + "\n" for row in rows)
    return path


def _plain(value: Any) -> Any:
    """A numpy value as the Python value JSON can write (rows read from CSV or Parquet may hold them)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


__all__ = ["Filtered", "check_output_path", "filter_pairs", "read_dataset", "read_train_pairs", "write_pairs"]
