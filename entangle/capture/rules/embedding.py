"""nn.Embedding: the per-example gradient is sparse by token id (THEORY §6)."""

from __future__ import annotations

import torch

from ..contrib import AlignedRows, EmbeddingRows
from . import register_rule


class UnsupportedModule(ValueError):
    """A module configuration the fast path cannot measure exactly."""


def _token_ids(module, inputs) -> torch.Tensor:
    return torch.unique(inputs[0])


@register_rule(torch.nn.Embedding, touched=_token_ids)
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
