"""Integrations: the training-time monitor and the trainer callback that drives it."""

from entangle.integrations.monitor import Monitor

__all__ = ["EntanglementCallback", "Monitor"]


def __getattr__(name: str):
    if name == "EntanglementCallback":  # imports transformers' Trainer: only when asked for
        from entangle.integrations.callback import EntanglementCallback

        return EntanglementCallback
    raise AttributeError(f"module 'entangle.integrations' has no attribute {name!r}")
