"""The dataset view: the training pairs measured inside the trainer's own pass, one row per dataset row (torch-free).

``EntanglementCallback(train_every=k)`` writes the ``train_pairs`` table (:data:`entangle.schema.TRAIN_PAIRS`): one
row per (step, rank, micro, pair), with ``index`` = the pair's row of ``trainer.train_dataset`` (-1 when unknown)
and ``excluded`` = its loss coefficient vanished, so that its measured columns are NaN. Over an epoch every row of
the dataset is measured, more than once over several. :func:`dataset_view` reduces the table to one row per
``index``; :func:`most_entangled` ranks them.

The entanglement score. A pair's gradient cosine cos(g_w, g_l) (THEORY.md §3) is scale-free: it compares pairs
of any length and any loss coefficient, and the closer it is to 1, the nearer a step that raises the chosen
log-prob comes to raising the rejected one with it (with DPO the chosen log-prob falls iff
cos > ‖g_w‖/‖g_l‖, the rejected rises iff cos > ‖g_l‖/‖g_w‖; neither can happen at cos <= 0). The score of a
dataset row is ``cosine_mean``, its cosine averaged over the steps it was measured at: one noisy step does not
decide it, and it is the number ``entangle filter`` ranks by. ``cosine_latest`` (the parameters the run ended
with) and ``ratio_mean`` (the DPO entanglement ratio ρ = ⟨g_w, g_l⟩ / min(‖g_w‖², ‖g_l‖²), > 1 = one of the
two moves the wrong way) rank the same way: higher is more entangled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from entangle.schema import REGIMES, TRAIN_PAIRS, validate

# the columns of dataset_view, in order
VIEW_COLUMNS = ("index", "n_measured", "n_excluded", "step_latest", "cosine_latest", "cosine_mean", "ratio_mean",
                *(f"share_{r}" for r in REGIMES), "regime_latest")
# the view's columns most_entangled ranks by: a higher value is a more entangled pair
SCORES = ("cosine_mean", "cosine_latest", "ratio_mean")
TEXT_FIELDS = ("prompt", "chosen", "rejected")


def dataset_view(train_pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset row (``index``, rows with index -1 left out) of a ``train_pairs`` frame, by index.

    Columns (:data:`VIEW_COLUMNS`):
        index: the row of ``trainer.train_dataset``;
        n_measured, n_excluded: how many times the row was measured, and how many times it was seen with a
            vanished loss coefficient (``excluded``: nothing measured);
        step_latest, cosine_latest, regime_latest: the step, cosine and regime of its latest measurement (the
            largest step; among rows of that step, the last in (rank, micro, pair) order); <NA>/NaN/None when
            the row was never measured;
        cosine_mean, ratio_mean: cos(g_w, g_l) and the ratio ρ averaged over its measurements (NaN values, where a
            gradient vanished, left out);
        share_<regime> for each of :data:`entangle.schema.REGIMES`: the share of its measurements in that regime
            (they sum to 1; NaN when never measured).

    Raises:
        ValueError: ``train_pairs`` lacks a column of the ``train_pairs`` table or has one of another dtype kind.
    """
    validate(TRAIN_PAIRS.name, train_pairs)
    rows = train_pairs[train_pairs["index"] >= 0] if len(train_pairs) else train_pairs
    if rows.empty:
        return pd.DataFrame(columns=list(VIEW_COLUMNS))
    excluded = rows["excluded"].astype(bool)
    measured = rows[~excluded].sort_values(["step", "rank", "micro", "pair"], kind="stable")
    by_index = measured.groupby("index")
    latest = by_index.tail(1).set_index("index")
    regime = measured["regime"].to_numpy()
    view = pd.DataFrame({
        "n_measured": by_index.size(),
        "n_excluded": excluded.groupby(rows["index"]).sum(),
        "step_latest": latest["step"],
        "cosine_latest": latest["cosine"].astype(float),
        "cosine_mean": by_index["cosine"].mean(),
        "ratio_mean": by_index["ratio"].mean(),
        **{f"share_{r}": pd.Series(regime == r, index=measured.index).groupby(measured["index"]).mean()
           for r in REGIMES},
        "regime_latest": latest["regime"],
    })
    view = view.rename_axis("index").sort_index().reset_index()
    view["n_measured"] = view["n_measured"].fillna(0).astype("int64")
    view["n_excluded"] = view["n_excluded"].astype("int64")
    view["step_latest"] = view["step_latest"].astype("Int64")
    view["regime_latest"] = view["regime_latest"].astype(object).where(view["regime_latest"].notna(), None)
    return view[list(VIEW_COLUMNS)]


def most_entangled(view: pd.DataFrame, k: int = 20, by: str = "cosine_mean") -> pd.DataFrame:
    """The ``k`` rows of a :func:`dataset_view` frame with the highest score ``by`` (one of :data:`SCORES`), most
    entangled first; rows without a finite score (never measured) are left out, ties go to the lower index.

    Raises:
        ValueError: ``k`` is not a positive integer, or ``by`` is not one of :data:`SCORES`.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}")
    if by not in SCORES:
        raise ValueError(f"cannot rank dataset rows by {by!r}: the scores are {', '.join(SCORES)}")
    ranked = view[np.isfinite(view[by].to_numpy(dtype=float))]
    return ranked.sort_values([by, "index"], ascending=[False, True], kind="stable").head(int(k))


def check_rows_cover(view: pd.DataFrame, n_rows: int, what: str) -> None:
    """Raise ``ValueError`` unless ``what`` (a dataset of ``n_rows`` rows) has every ``index`` of ``view``.

    The index counts the rows of ``trainer.train_dataset`` from 0: a dataset with fewer rows is not the one the
    trainer was given.
    """
    if len(view) and int(view["index"].max()) >= n_rows:
        raise ValueError(f"{what} has {n_rows} row(s), but the run measured dataset row {int(view['index'].max())} "
                         "(index counts the rows of trainer.train_dataset from 0): is it the dataset the trainer "
                         "was given?")


def pair_texts(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The ``pairs_text`` frame (:data:`entangle.schema.PAIRS_TEXT`) of preference rows: ``index`` (the row number)
    and the ``prompt``, ``chosen`` and ``rejected`` text; a conversational value (a list of ``{"role",
    "content"}`` messages) becomes one ``role: content`` line per message."""
    return pd.DataFrame({"index": np.arange(len(rows), dtype=np.int64),
                         **{f: [_text(row[f]) for row in rows] for f in TEXT_FIELDS}})


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(f"{m['role']}: {m['content']}" for m in value)


__all__ = ["SCORES", "VIEW_COLUMNS", "check_rows_cover", "dataset_view", "most_entangled", "pair_texts"]
