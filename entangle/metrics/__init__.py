"""Metrics: pure functions of tensors and frames (objectives and their coefficients, per-pair frames)."""

from entangle.metrics.objectives import (
    Objective,
    WeightedObjective,
    available_objectives,
    coefficients,
    get_objective,
    register_objective,
    resolve_objective,
)
from entangle.metrics.pairs import PAIR_COLUMNS, REGIMES, batch_weights, pair_frame, regime_of, summarize

__all__ = [
    "PAIR_COLUMNS",
    "REGIMES",
    "Objective",
    "WeightedObjective",
    "available_objectives",
    "batch_weights",
    "coefficients",
    "get_objective",
    "pair_frame",
    "regime_of",
    "register_objective",
    "resolve_objective",
    "summarize",
]
