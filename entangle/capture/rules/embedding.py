"""nn.Embedding: the per-example gradient is sparse by token id (THEORY §6)."""

from __future__ import annotations

import torch

from ..contrib import AlignedRows, EmbeddingRows
from . import register_rule


class UnsupportedModule(ValueError):
    """A module configuration the fast path cannot measure exactly."""


def _token_ids(module, inputs) -> torch.Tensor:
    return torch.unique(inputs[0])


def _embedding_dense(module, inputs, grad_out, into: dict) -> dict | None:
    """Whole per-example gradients [N, num_embeddings, d] (added to ``into["weight"]`` if given): each position's
    output gradient added to its token's row (one ``index_add_``); the padding row gets nothing, as PyTorch never
    updates it."""
    if module.max_norm is not None or module.scale_grad_by_freq or inputs[0].dim() != 2:
        return None
    ids, n, rows = inputs[0], grad_out.shape[0], module.num_embeddings
    if module.padding_idx is not None:
        grad_out = grad_out.masked_fill((ids == module.padding_idx)[..., None], 0)
    out = into.get("weight")
    if out is None:
        out = grad_out.new_zeros(n, rows, grad_out.shape[-1])
    flat = (ids + torch.arange(n, device=ids.device)[:, None] * rows).reshape(-1)
    out.view(n * rows, -1).index_add_(0, flat, grad_out.reshape(-1, grad_out.shape[-1]).to(out.dtype))
    return {"weight": out}


@register_rule(torch.nn.Embedding, touched=_token_ids, dense=_embedding_dense)
def embedding(module, inputs, grad_out, valid, mode):
    if module.max_norm is not None or module.scale_grad_by_freq:
        raise UnsupportedModule("Embedding with max_norm/scale_grad_by_freq is not supported by the fast path")
    ids = inputs[0]
    if module.padding_idx is not None:                 # PyTorch never updates the padding row
        valid = valid & (ids != module.padding_idx)
    if (ids.dim() == 2 and ids.shape[0] > 1 and ids.stride(0) == 0 and module.padding_idx is None
            and torch.unique(ids[0]).numel() == ids.shape[1]):     # position ids broadcast over the batch
        return {"weight": AlignedRows(ids[0], grad_out, module.num_embeddings)}
    return {"weight": EmbeddingRows(ids, grad_out, valid, module.num_embeddings)}
