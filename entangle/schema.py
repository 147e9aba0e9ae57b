"""The run directory's tables: one statement of their names, keys, columns and dtypes (torch-free).

A run directory (``entangle.runio``) holds one folder per table. :data:`TABLES` says, for each table the toolkit
writes, what one row is, which columns identify a row (``keys``), which columns every part must have
(``columns``) and which it may have (``optional``), each with its dtype kind (``"int"``, ``"float"`` — any real
number —, ``"bool"`` or ``"str"``). :func:`validate` checks a frame against it; ``RunWriter.write`` calls it, so
a table on disk always has the columns the report reads. Tables not listed here are the user's own and are
written as they come.

The per-pair regimes (THEORY.md §3, the ``regime`` column) are :data:`REGIMES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

REGIMES = ("ideal", "both_rise", "both_fall", "chosen_falls_rejected_rises")

# ``pair_frame``'s columns and their dtype kinds, in order (it adds ``step`` and the reference log-probs, when
# given, and the extra per-pair columns; the reference log-probs come before ``loss``)
PAIR_DTYPES: dict[str, str] = {
    "pair": "int", "logp_chosen": "float", "logp_rejected": "float", "len_chosen": "int", "len_rejected": "int",
    "norm2_chosen": "float", "norm2_rejected": "float", "inner": "float", "cosine": "float", "ratio": "float",
    "a_chosen": "float", "a_rejected": "float", "pred_dlogp_chosen": "float", "pred_dlogp_rejected": "float",
    "batch_dlogp_chosen": "float", "batch_dlogp_rejected": "float",
    "chosen_rises": "bool", "rejected_falls": "bool", "batch_chosen_rises": "bool", "batch_rejected_falls": "bool",
    "regime": "str", "margin": "float", "loss": "float",
}
PAIR_COLUMNS = tuple(PAIR_DTYPES)

# the quantities ``summarize`` reduces to a mean and the 10/50/90% quantiles per step
SUMMARY_QUANTITIES = ("cosine", "ratio", "inner", "norm2_chosen", "norm2_rejected")

# a column naming each pair's group (the built-in task's pair kind), in the pairs or the covariates table
GROUP_COLUMNS = ("kind", "group")

_KINDS = {
    "int": lambda s: pd.api.types.is_integer_dtype(s) and not pd.api.types.is_bool_dtype(s),
    "float": lambda s: pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s),
    "bool": pd.api.types.is_bool_dtype,
    "str": lambda s: s.dtype.kind in "OSU",
}


@dataclass(frozen=True)
class Table:
    """One table of a run directory: its name, what one row is, its key, required and optional columns."""

    name: str
    row: str
    keys: tuple[str, ...]
    columns: Mapping[str, str]
    optional: Mapping[str, str] = field(default_factory=dict)

    def dtype_of(self, column: str) -> str | None:
        """The dtype kind of ``column`` (required or optional), None for a column the schema does not name."""
        return self.columns.get(column, self.optional.get(column))


def _summary(name: str, row: str, batch: bool = True) -> Table:
    """A summary table; ``batch=False``: of pairs without the batch view and the loss (``train_pairs``)."""
    shares = {f"{view}share_{r}": "float" for view in ("", "batch_")[:1 + batch] for r in REGIMES}
    quantities = {f"{q}_{s}": "float" for q in SUMMARY_QUANTITIES for s in ("mean", "q10", "q50", "q90")}
    return Table(name, row, ("step",),
                 {"step": "int", "n_pairs": "int", "n_excluded": "int", **shares, **quantities,
                  **({"loss_mean": "float"} if batch else {}), "ranking_accuracy": "float"},
                 {"ranking_accuracy_ref_adjusted": "float", "ref_ranking_accuracy": "float",
                  "idealized_ranking_accuracy": "float", "ranking_accuracy_gap": "float"})


PAIRS = Table("pairs", "one (step, pair): entangle.metrics.pair_frame", ("step", "pair"),
              {"step": "int", **PAIR_DTYPES},
              {"ref_logp_chosen": "float", "ref_logp_rejected": "float", "kind": "str", "group": "str"})
SUMMARY = _summary("summary", "one step: entangle.metrics.summarize of the pairs table")
SUMMARY_ADAM = _summary("summary_adam", "one step: the summary in Adam's preconditioned geometry (THEORY.md §5)")
LAYERS = Table("layers", "one (step, pair, layer): the within-pair Gram entries of one layer's parameters",
               ("step", "pair", "layer"),
               {"step": "int", "pair": "int", "layer": "str", "inner": "float", "norm2_chosen": "float",
                "norm2_rejected": "float", "cosine": "float"})
UPDATES = Table("updates", "one (step, sequence): the observed change of its log-prob over one real update and "
                "its first-order predictions", ("step", "seq"),
                {"step": "int", "seq": "int", "pair": "int", "side": "str", "logp_before": "float",
                 "logp_after": "float", "observed": "float", "pred_update": "float", "pred_gradient": "float"})
TOKENS = Table("tokens", "one (step, pair, block, t, u): per-token gradient products (Monitor.token_maps)",
               ("step", "pair", "which", "block", "t", "u"),
               {"step": "int", "pair": "int", "which": "str", "method": "str", "block": "str", "t": "int",
                "u": "int", "token_w": "str", "token_u": "str", "inner": "float", "cosine": "float"})
COVARIATES = Table("covariates", "one pair: entangle.metrics.pair_covariates (text and forward-only covariates)",
                   ("pair",),
                   {"pair": "int", "shared_prefix_len": "int", "edit_distance": "int", "jaccard": "float",
                    "len_chosen": "int", "len_rejected": "int"},
                   {"step": "int", "kind": "str", "group": "str", "ches": "float", "ches_norm": "float",
                    "embed_cosine": "float"})

# the per-pair columns of a training pass (``EntanglementCallback(train_every=k)``): those of ``pair_frame`` that
# need no extra pass; ``a_*`` and ``pred_dlogp_*`` use the coefficients the trainer's own loss put on the pair
TRAIN_PAIR_DTYPES: dict[str, str] = {
    "logp_chosen": "float", "logp_rejected": "float", "len_chosen": "int", "len_rejected": "int",
    "norm2_chosen": "float", "norm2_rejected": "float", "inner": "float", "cosine": "float", "ratio": "float",
    "a_chosen": "float", "a_rejected": "float", "pred_dlogp_chosen": "float", "pred_dlogp_rejected": "float",
    "chosen_rises": "bool", "rejected_falls": "bool", "regime": "str", "margin": "float", "excluded": "bool",
}
TRAIN_PAIRS = Table("train_pairs", "one (step, micro, pair): a training pair measured inside the trainer's own forward "
                    "and backward pass (index = its row of trainer.train_dataset, -1 if unknown; excluded = its loss "
                    "coefficient vanished, so its gradients cannot be recovered and its measured columns are NaN)",
                    ("step", "rank", "micro", "pair"),
                    {"step": "int", "rank": "int", "micro": "int", "pair": "int", "index": "int", **TRAIN_PAIR_DTYPES})
TRAIN_SUMMARY = _summary("train_summary", "one step: entangle.metrics.summarize of the train_pairs table", batch=False)
PAIRS_TEXT = Table("pairs_text", "one dataset row: the text of a training pair (index = its row of "
                   "trainer.train_dataset), shown beside the most entangled pairs in the report", ("index",),
                   {"index": "int", "prompt": "str", "chosen": "str", "rejected": "str"})

TABLES: dict[str, Table] = {t.name: t for t in (PAIRS, SUMMARY, SUMMARY_ADAM, LAYERS, UPDATES, TOKENS, COVARIATES,
                                                 TRAIN_PAIRS, TRAIN_SUMMARY, PAIRS_TEXT)}


def validate(table: str, frame: pd.DataFrame) -> None:
    """Check ``frame`` against the schema of ``table``; a table the schema does not name passes as it is.

    Raises:
        ValueError: a required column is missing, or a column of a non-empty frame has another dtype kind than the
            schema's; the message names the table and the columns.
    """
    spec = TABLES.get(table)
    if spec is None:
        return
    missing = [c for c in spec.columns if c not in frame.columns]
    if missing:
        raise ValueError(f"table {table!r} lacks required column(s) {missing} (it has {list(frame.columns)})")
    if frame.empty:        # an empty frame's columns have no dtype to speak of
        return
    wrong = [f"{c!r} is {frame[c].dtype}, expected {kind}" for c in frame.columns
             if (kind := spec.dtype_of(c)) is not None and not _KINDS[kind](frame[c])]
    if wrong:
        raise ValueError(f"table {table!r}: column {'; '.join(wrong)}")


def group_column(*frames: pd.DataFrame) -> str | None:
    """The first of :data:`GROUP_COLUMNS` that one of ``frames`` has, or None."""
    return next((c for c in GROUP_COLUMNS for f in frames if c in f.columns), None)


__all__ = ["COVARIATES", "GROUP_COLUMNS", "LAYERS", "PAIRS", "PAIRS_TEXT", "PAIR_COLUMNS", "PAIR_DTYPES", "REGIMES", "SUMMARY", "SUMMARY_ADAM",
           "SUMMARY_QUANTITIES", "TABLES", "TOKENS", "TRAIN_PAIRS", "TRAIN_PAIR_DTYPES", "TRAIN_SUMMARY", "UPDATES", "Table",
           "group_column", "validate"]
