"""nn.Linear and transformers' Conv1D (GPT-2): weight gradients factor as (output grads)^T (inputs)."""

from __future__ import annotations

import torch

from ..contrib import Dense, Factored
from . import register_rule


def _bias(grad_out: torch.Tensor) -> Dense:
    return Dense(grad_out.sum(1))                      # g_i(b) = sum_t delta_t


@register_rule(torch.nn.Linear, batch_key=lambda m: m.bias is None, affine=True)
def linear(module, inputs, grad_out, valid, mode):
    """y = x W^T + b, W [out, in]: g_i(W) = G_i^T A_i."""
    a = inputs[0].to(grad_out.dtype)
    out = {"weight": Factored.from_padded(grad_out, a, valid, mode)}
    if module.bias is not None:
        out["bias"] = _bias(grad_out)
    return out


@register_rule("Conv1D", batch_key=lambda m: None, affine=True)
def conv1d(module, inputs, grad_out, valid, mode):
    """transformers.pytorch_utils.Conv1D: y = x W + b, W [in, out]: g_i(W) = A_i^T G_i."""
    a = inputs[0].to(grad_out.dtype)
    return {"weight": Factored.from_padded(a, grad_out, valid, mode), "bias": _bias(grad_out)}
