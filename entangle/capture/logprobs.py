"""Summed response log-probabilities of a batch, as TRL's DPOTrainer computes them."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, so left- and right-padded batches see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def on_device(batch: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The batch's tensors moved to the device of ``model``'s parameters."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def check_batch(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    """Clear errors for a batch that cannot be measured, naming the sequence and its pair.

    Checks the three keys and their shapes, that token ids fit the model's vocabulary (a tokenizer that does
    not belong to the model), and that every sequence has at least one response token inside its attention.
    """
    missing = [k for k in ("input_ids", "attention_mask", "completion_mask") if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; build it with entangle.encode_pairs")
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    if not (ids.shape == att.shape == comp.shape) or ids.dim() != 2:
        raise ValueError(f"batch tensors must share one shape [N, L]; got "
                         f"{tuple(ids.shape)}, {tuple(att.shape)}, {tuple(comp.shape)}")
    b = ids.shape[0] // 2

    def which(seq: int) -> str:
        if ids.shape[0] % 2:                 # not a pair batch (e.g. token-map prefix copies)
            return f"sequence {seq}"
        return f"sequence {seq} (pair {seq % b}, {'chosen' if seq < b else 'rejected'})"

    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", None)
    if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
        seq = int((ids >= vocab).any(1).nonzero()[0, 0])
        raise ValueError(f"{which(seq)} has token id "
                         f"{int(ids[seq].max())} but the model's vocabulary has {vocab} entries: the tokenizer "
                         "does not match the model")
    scored = (comp[:, 1:].bool() & att[:, 1:].bool()).sum(1)
    if (scored == 0).any():
        seq = int((scored == 0).nonzero()[0, 0])
        raise ValueError(f"{which(seq)} has no response token to score (empty response, or truncated away)")


def model_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits [N, L, V] of a causal LM on ``batch`` (``input_ids``, ``attention_mask``)."""
    ids = batch["input_ids"]
    mask = batch["attention_mask"]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def token_logps(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log-probs [N, L] of the response tokens (0 elsewhere), computed in float32 or better.

    Token ``t`` is predicted by the logits at ``t - 1``; ``completion_mask[:, t]`` marks response tokens. A batch
    with ``token_weights`` [N, L] (``entangle.mitigate.token_mask.mask_batch``) gets each log-prob times its weight.
    """
    ids = batch["input_ids"]
    mask = batch["completion_mask"][:, 1:].to(torch.bool)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits[:, :-1].to(dtype)
    lp = -torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    lp = lp.masked_fill(~mask, 0.0)
    if "token_weights" in batch:
        lp = lp * batch["token_weights"][:, 1:].to(lp.dtype)
    return torch.nn.functional.pad(lp, (1, 0))


def sequence_logps(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed response log-probabilities [N] (nats), differentiable w.r.t. the model's parameters."""
    return token_logps(model_logits(model, batch), batch).sum(-1)


def response_lengths(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Number of response tokens per sequence [N] (int64)."""
    return batch["completion_mask"].long().sum(-1)
