"""Fallback for any module without a rule: per-example vector-Jacobian products of the module alone.

For sequence i it re-runs the module on that sequence's inputs and pulls the captured output
gradient back to the module's own parameters. Exact for any module without batch statistics;
slower than a rule, so the engine reports which modules used it.
"""

from __future__ import annotations

import torch

from ..contrib import Dense


def map_tensors(x, fn):
    """``x`` (a tensor, or tuples / lists / dicts of them, nested) with ``fn`` applied to every tensor."""
    if torch.is_tensor(x):
        return fn(x)
    if isinstance(x, tuple | list):
        return type(x)(map_tensors(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    return x


def _slice(x, i: int, n: int):
    """Sequence ``i`` of every tensor with batch dimension ``n``, detached: only the module's own parameters are
    differentiated, and the forward graph the inputs came from may already be freed."""
    return map_tensors(x, lambda t: (t[i:i + 1] if t.dim() > 0 and t.shape[0] == n else t).detach())


def _tensors(out) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for v in out for t in _tensors(v)]
    return []


def generic(module, args, kwargs, grad_outs: list[torch.Tensor | None], names: list[str], n: int) -> dict:
    """Per-example gradients of ``module``'s own parameters ``names`` given the output gradients.

    The module is re-run in float32 (float64 for float64 parameters): its floating parameters, buffers and
    inputs are upcast, so a bfloat16 module (or one whose inputs come from an autocast region) gives per-example
    gradients summed in float32 over positions, as the other rules do, not rounded to bfloat16.
    """
    wide = torch.float64 if module._parameters[names[0]].dtype == torch.float64 else torch.float32

    def up(t: torch.Tensor) -> torch.Tensor:
        return t.to(wide) if t.is_floating_point() else t

    state = {k: up(t.detach()) for k, t in (*module.named_parameters(), *module.named_buffers())}
    params = [state[k].requires_grad_() for k in names]
    per = [torch.zeros((n, *p.shape), dtype=wide, device=p.device) for p in params]
    with torch.enable_grad():
        for i in range(n):
            call_args, call_kwargs = map_tensors(_slice((args, kwargs), i, n), up)
            outs = _tensors(torch.func.functional_call(module, state, call_args, call_kwargs))
            pairs = [(o, g[i:i + 1].to(o.dtype)) for o, g in zip(outs, grad_outs, strict=False)
                     if g is not None and o.requires_grad]
            if not pairs:
                continue
            grads = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True)
            for buf, g in zip(per, grads, strict=True):
                if g is not None:
                    buf[i] = g
    return {k: Dense(v) for k, v in zip(names, per, strict=True)}
