"""Selecting the parameter set over which gradients are measured (THEORY §1)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator

import torch

ParamSpec = None | str | Callable[[str, torch.nn.Parameter], bool] | Iterable[str]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel / DataParallel wrappers (their forward would sync gradients)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
        model = model.module
    return model


def select_params(model: torch.nn.Module, params: ParamSpec = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The measured parameters as ``(name, parameter)`` in ``named_parameters`` order.

    ``params`` is ``None`` (every parameter with ``requires_grad``), ``"lora"`` (PEFT LoRA adapter
    weights only), a regular expression searched in each parameter name (frozen parameters
    included), a callable ``(name, param) -> bool``, or an iterable of exact names.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif isinstance(params, str) and params == "lora":
        chosen = [(n, p) for n, p in named if "lora_" in n]
        if not chosen:
            raise ValueError("params='lora' but the model has no LoRA adapter parameters (no 'lora_' in any name)")
    elif isinstance(params, str):
        rx = re.compile(params)
        chosen = [(n, p) for n, p in named if rx.search(n)]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        wanted = list(params)
        have = dict(named)
        missing = [w for w in wanted if w not in have]
        if missing:
            raise ValueError(f"unknown parameter names {missing[:5]}; e.g. {list(have)[:5]}")
        chosen = [(n, have[n]) for n in wanted]
    if not chosen:
        raise ValueError(f"params={params!r} selects no parameter of {type(model).__name__}")
    return chosen


@contextlib.contextmanager
def parameters_at(named: list[tuple[str, torch.nn.Parameter]], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily copy ``values`` into the parameters; the current values are copied back bit for bit."""
    current = {n: p.detach().clone() for n, p in named}
    try:
        with torch.no_grad():
            for n, p in named:
                p.copy_(values[n])
        yield
    finally:
        with torch.no_grad():
            for n, p in named:
                p.copy_(current[n])
