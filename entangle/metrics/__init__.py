"""Metrics: pure functions of tensors and frames (objectives and their coefficients, per-pair frames, summaries).

Names are imported lazily, so the torch-free submodules (``summary``, ``agreement``) load without torch:
``entangle.metrics.summarize`` imports only what it needs, ``entangle.metrics.pair_frame`` brings in torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Objective": "entangle.metrics.objectives",
    "WeightedObjective": "entangle.metrics.objectives",
    "available_objectives": "entangle.metrics.objectives",
    "coefficients": "entangle.metrics.objectives",
    "get_objective": "entangle.metrics.objectives",
    "register_objective": "entangle.metrics.objectives",
    "resolve_objective": "entangle.metrics.objectives",
    "batch_weights": "entangle.metrics.pairs",
    "pair_frame": "entangle.metrics.pairs",
    "regime_of": "entangle.metrics.summary",
    "summarize": "entangle.metrics.summary",
    "moved": "entangle.metrics.agreement",
    "sign_agreement": "entangle.metrics.agreement",
    "PAIR_COLUMNS": "entangle.schema",
    "REGIMES": "entangle.schema",
}

__all__ = sorted(_EXPORTS)

_SUBMODULES = {"agreement", "covariates", "objectives", "pairs", "summary"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:                       # entangle.metrics.pairs works without an explicit import
        return importlib.import_module(f"entangle.metrics.{name}")
    raise AttributeError(f"module 'entangle.metrics' has no attribute {name!r}")
