"""The slow, obviously-correct twin: one backward pass per sequence, flattened gradients, float64."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .logprobs import model_logits, response_lengths, token_logps
from .result import GramResult, Measurement


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


def exact_measurement(model, batch: Mapping[str, torch.Tensor], named_params, forward: Callable = model_logits,
                      plain: bool = True, preconditioner: Mapping[str, torch.Tensor] | None = None,
                      delta: Mapping[str, torch.Tensor] | None = None) -> Measurement:
    """The views of :func:`entangle.capture.measure` from materialised per-sequence gradients (the test twin).

    Gram entries are ``g_i^T g_j`` (plain) and ``g_i^T P g_j`` (with a diagonal ``preconditioner`` P per parameter
    name); the update view is ``<g_i, delta>``.
    """
    logps, grads = per_sequence_grads(model, batch, named_params, forward)
    logps, lengths = logps.to(torch.float64), response_lengths(batch)
    info = {n: "exact" for n, _ in named_params}

    def gram(metric, geometry):
        per_param = {}
        for k, (name, _) in enumerate(named_params):
            flat = torch.stack([g[k].flatten() for g in grads])
            weight = 1.0 if metric is None else metric[name].flatten().to(torch.float64)
            per_param[name] = (flat * weight) @ flat.T
        return GramResult(matrix=sum(per_param.values()), logps=logps, lengths=lengths, per_param=per_param,
                          method="exact", info=info, geometry=geometry)

    update = None
    if delta is not None:
        flat = torch.cat([delta[name].flatten().to(torch.float64) for name, _ in named_params])
        update = torch.stack([torch.cat([x.flatten() for x in g]) @ flat.to(g[0].device) for g in grads]).cpu()
    return Measurement(logps=logps, lengths=lengths, plain=gram(None, "plain") if plain else None,
                       preconditioned=None if preconditioner is None else gram(preconditioner, "preconditioned"),
                       update=update, method="exact", info=info)
