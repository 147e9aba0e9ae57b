"""nn.Linear and transformers' Conv1D (GPT-2): weight gradients factor as (output grads)^T (inputs)."""

from __future__ import annotations

import torch

from ..contrib import Dense, Factored
from . import register_rule


def _bias(grad_out: torch.Tensor) -> Dense:
    return Dense(grad_out.sum(1))                      # g_i(b) = sum_t delta_t


def _product(left: torch.Tensor, right: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor | None:
    """``left^T right`` per example [N, ·, ·] (added to ``into`` if given); None if not finite (a non-finite input at a
    position without a gradient, which the rule's contribution skips)."""
    out = torch.bmm(left.transpose(1, 2), right)
    if not torch.isfinite(out.sum()):
        return None
    return out if into is None else into.add_(out)


def _affine_dense(module, left: torch.Tensor, right: torch.Tensor, grad_out: torch.Tensor, into: dict) -> dict | None:
    weight = _product(left, right, into.get("weight"))
    if weight is None:
        return None
    out = {"weight": weight}
    if module.bias is not None:
        out["bias"] = grad_out.sum(1) if into.get("bias") is None else into["bias"].add_(grad_out.sum(1))
    return out


def _linear_dense(module, inputs, grad_out, into: dict) -> dict | None:
    """Whole per-example gradients: weight [N, out, in] = G_i^T A_i (one batched product), bias [N, out]."""
    return _affine_dense(module, grad_out, inputs[0].to(grad_out.dtype), grad_out, into)


def _conv1d_dense(module, inputs, grad_out, into: dict) -> dict | None:
    """Whole per-example gradients: weight [N, in, out] = A_i^T G_i, bias [N, out]."""
    return _affine_dense(module, inputs[0].to(grad_out.dtype), grad_out, grad_out, into)


@register_rule(torch.nn.Linear, batch_key=lambda m: m.bias is None, affine=True, dense=_linear_dense)
def linear(module, inputs, grad_out, valid, mode):
    """y = x W^T + b, W [out, in]: g_i(W) = G_i^T A_i."""
    a = inputs[0].to(grad_out.dtype)
    out = {"weight": Factored.from_padded(grad_out, a, valid, mode)}
    if module.bias is not None:
        out["bias"] = _bias(grad_out)
    return out


@register_rule("Conv1D", batch_key=lambda m: None, affine=True, dense=_conv1d_dense)
def conv1d(module, inputs, grad_out, valid, mode):
    """transformers.pytorch_utils.Conv1D: y = x W + b, W [in, out]: g_i(W) = A_i^T G_i."""
    a = inputs[0].to(grad_out.dtype)
    return {"weight": Factored.from_padded(a, grad_out, valid, mode), "bias": _bias(grad_out)}
