"""Slow, obviously-correct twins of fast paths that the product itself does not need (the tests' own).

(The Gram matrix's twin, one backward per sequence, is the product's ``method="exact"``.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from entangle.capture.engine import measurement_mode
from entangle.capture.logprobs import model_logits, token_logps
from entangle.capture.params import ParamSpec, select_params, unwrap_model
from entangle.capture.tokens import pair_rows, response_positions


def loop_token_grads(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], pair: int,
                      params: ParamSpec = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The slow twin: one backward per response token with a retained graph, flattened gradients [K, P].

    This is the approach of the paper's public heatmap script; ``token_gram`` must agree with ``G G^T``.
    """
    model = unwrap_model(model)
    named = select_params(model, params)
    rows = pair_rows(batch, pair)
    sub = {k: batch[k][list(rows)] for k in ("input_ids", "attention_mask", "completion_mask")}
    with measurement_mode(model, named):
        lp = token_logps(model_logits(model, sub), sub)
        targets = [(j, int(p)) for j, r in enumerate(rows) for p in response_positions(batch, r)]
        out = []
        for k, (j, p) in enumerate(targets):
            g = torch.autograd.grad(lp[j, p], [q for _, q in named], retain_graph=k + 1 < len(targets),
                                    allow_unused=True)
            out.append(torch.cat([(torch.zeros_like(q) if x is None else x).flatten().to(dtype)
                                  for x, (_, q) in zip(g, named, strict=True)]))
    return torch.stack(out)
