"""LayerNorm and RMSNorm: vector parameters, so per-example gradients are materialised."""

from __future__ import annotations

import torch

from ..contrib import Dense
from . import register_rule


def _norm_key(module) -> tuple:
    return (tuple(module.normalized_shape), module.eps, module.weight is None, getattr(module, "bias", None) is None)


@register_rule(torch.nn.LayerNorm, batch_key=_norm_key, positions=False)
def layer_norm(module, inputs, grad_out, valid, mode):
    """y = x_hat * w + b over the last dim: g_i(w) = sum_t delta_t * x_hat_t, g_i(b) = sum_t delta_t."""
    # x_hat by the kernel the forward used (one fused op; the mean/var/rsqrt chain costs five at small shapes)
    x_hat = torch.nn.functional.layer_norm(inputs[0].to(grad_out.dtype), module.normalized_shape, eps=module.eps)
    out = {}
    if module.weight is not None:
        out["weight"] = Dense((grad_out * x_hat).sum(1))
    if module.bias is not None:
        out["bias"] = Dense(grad_out.sum(1))
    return out


@register_rule("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MixtralRMSNorm",
               batch_key=lambda m: m.variance_epsilon, positions=False)
def llama_rms_norm(module, inputs, grad_out, valid, mode):
    """y = w * (x / rms(x)).to(input dtype), normalised in float32 (transformers' LlamaRMSNorm)."""
    x = inputs[0]
    xf = x.to(torch.float32)
    x_hat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype)
    return {"weight": Dense((grad_out * x_hat.to(grad_out.dtype)).sum(1))}


@register_rule(torch.nn.RMSNorm, batch_key=_norm_key, positions=False)
def rms_norm(module, inputs, grad_out, valid, mode):
    """torch.nn.RMSNorm: y = w * x / sqrt(mean(x^2) + eps)."""
    x = inputs[0].to(grad_out.dtype)
    dims = tuple(range(-len(module.normalized_shape), 0))
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    x_hat = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    return {"weight": Dense((grad_out * x_hat).sum(1))} if module.weight is not None else {}
