"""entangle: see why preference optimisation moves chosen and rejected log-probs the way it does.

The public names are imported lazily, so ``import entangle`` stays cheap and optional
integrations (trl, peft, accelerate) are only imported when used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # data
    "load_pairs": "entangle.data", "encode_pairs": "entangle.data", "PairError": "entangle.data",
    # capture
    "sequence_gram": "entangle.capture.measure", "update_dot": "entangle.capture.measure",
    "measure": "entangle.capture.measure", "pair_statistics": "entangle.capture.measure",
    "Measurement": "entangle.capture.result", "PairStats": "entangle.capture.result",
    "GramResult": "entangle.capture.result", "sequence_logps": "entangle.capture.logprobs",
    "select_params": "entangle.capture.params", "adam_preconditioner": "entangle.capture.optim",
    "token_map": "entangle.capture.tokens",
    # metrics
    "pair_frame": "entangle.metrics", "summarize": "entangle.metrics", "coefficients": "entangle.metrics",
    "batch_weights": "entangle.metrics",
    "register_objective": "entangle.metrics", "available_objectives": "entangle.metrics",
    "pair_covariates": "entangle.metrics.covariates", "covariate_report": "entangle.metrics.covariates",
    # integrations
    "verify_step": "entangle.verify", "Monitor": "entangle.integrations.monitor",
    "EntanglementCallback": "entangle.integrations.callback", "analyze": "entangle.integrations.checkpoints",
    "read_run": "entangle.runio",
    # mitigations
    "pairwise_normalized_backward": "entangle.mitigate",
    "PairwiseNormalizedDPOTrainer": "entangle.mitigate.trainer",
    "TokenMaskedDPOTrainer": "entangle.mitigate.token_mask", "mask_batch": "entangle.mitigate.token_mask",
    # report
    "make_report": "entangle.report",
}

__all__ = sorted(_EXPORTS)


_SUBMODULES = {"data", "capture", "metrics", "report", "integrations", "verify", "runio", "builtin", "demo", "cli",
               "mitigate"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:                       # entangle.verify.make_step_fn works without an explicit import
        return importlib.import_module(f"entangle.{name}")
    raise AttributeError(f"module 'entangle' has no attribute {name!r}")
