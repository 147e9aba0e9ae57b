"""The slow, obviously-correct twin: one backward pass per sequence, flattened gradients, float64."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .logprobs import model_logits, response_lengths, token_logps
from .result import GramResult


def per_sequence_grads(model, batch, named_params, forward: Callable = model_logits) -> tuple[torch.Tensor, list]:
    """Log-probs [N] and, per sequence, the list of its float64 gradients (one ``autograd.grad`` each)."""
    params = [p for _, p in named_params]
    logps = token_logps(forward(model, batch), batch).sum(-1)
    grads = []
    for i in range(logps.shape[0]):
        g = torch.autograd.grad(logps[i], params, retain_graph=i + 1 < logps.shape[0], allow_unused=True)
        grads.append([torch.zeros_like(p, dtype=torch.float64) if x is None else x.to(torch.float64)
                      for x, p in zip(g, params, strict=True)])
    return logps.detach(), grads


def exact_gram(model, batch: Mapping[str, torch.Tensor], named_params, forward: Callable = model_logits,
               preconditioner: Mapping[str, torch.Tensor] | None = None) -> GramResult:
    """Gram matrix from materialised per-sequence gradients (test twin of the hook engine).

    With a diagonal ``preconditioner`` P (per parameter name) the entries are ``g_i^T P g_j``.
    """
    logps, grads = per_sequence_grads(model, batch, named_params, forward)
    per_param = {}
    for k, (name, _) in enumerate(named_params):
        flat = torch.stack([g[k].flatten() for g in grads])
        weight = 1.0 if preconditioner is None else preconditioner[name].flatten().to(torch.float64)
        per_param[name] = (flat * weight) @ flat.T
    matrix = sum(per_param.values())
    return GramResult(matrix=matrix, logps=logps.to(torch.float64), lengths=response_lengths(batch),
                      per_param=per_param, method="exact", info={n: "exact" for n, _ in named_params})
