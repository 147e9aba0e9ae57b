"""Prefix copies: one left-padded copy of a sequence per response token, ending just before it (THEORY §7).

The fallback of ``token_map(method="full")`` for models whose block stack the block-wise pass cannot use: the K
copies run through the whole model at once, so any causal LM works, but memory grows with K times the depth.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..logprobs import position_ids_from_mask
from .positions import response_positions


def prefix_copies(batch: Mapping[str, torch.Tensor], rows: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One left-padded copy per response token of ``rows``, ending just before that token.

    Returns ``context_ids`` / ``context_mask`` [K, P] (P = the longest prefix) and a two-column batch in the
    layout ``token_logps`` reads: ``input_ids`` [K, 2] with the scored token in column 1 and
    ``completion_mask`` [K, 2] = (0, 1). Padding and prompt tokens of the original rows keep their masks.
    """
    ids, att = batch["input_ids"], batch["attention_mask"]
    spans = [(r, int(p)) for r in rows for p in response_positions(batch, r)]
    width = max(p for _, p in spans)
    k = len(spans)
    ctx = torch.zeros(k, width, dtype=ids.dtype, device=ids.device)
    ctx_mask = torch.zeros(k, width, dtype=att.dtype, device=att.device)
    target = torch.zeros(k, 2, dtype=ids.dtype, device=ids.device)
    for j, (r, p) in enumerate(spans):
        ctx[j, width - p:] = ids[r, :p]
        ctx_mask[j, width - p:] = att[r, :p]
        target[j, 1] = ids[r, p]
    comp = torch.zeros_like(target)
    comp[:, 1] = 1
    return {"input_ids": target, "completion_mask": comp, "attention_mask": torch.ones_like(target),
            "context_ids": ctx, "context_mask": ctx_mask}


def last_position_logits(model: torch.nn.Module, copies: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits [K, 2, V] for :func:`prefix_copies`: row 0 holds each copy's last-position logits.

    Only the last position goes through the output layer (``logits_to_keep=1`` where the model accepts it),
    so the head costs K rows, not K x P. Row 1 is a placeholder that ``token_logps`` never reads.
    """
    mask = copies["context_mask"]
    kwargs = {"input_ids": copies["context_ids"], "attention_mask": mask,
              "position_ids": position_ids_from_mask(mask), "use_cache": False}
    try:
        out = model(**kwargs, logits_to_keep=1)
    except TypeError:                                   # a model without logits_to_keep: every position
        out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.cat([logits[:, -1:], torch.zeros_like(logits[:, -1:])], 1)
