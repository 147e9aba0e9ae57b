"""Where a pair's response tokens are in a batch."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def response_positions(batch: Mapping[str, torch.Tensor], row: int) -> torch.Tensor:
    """Positions [T] (int64, ascending) of the response tokens of sequence ``row``."""
    pos = batch["completion_mask"][row].to(torch.bool).nonzero().flatten()
    if pos.numel() and int(pos[0]) == 0:
        raise ValueError(f"sequence {row}: a response token at position 0 has no context to be predicted from")
    return pos


def pair_rows(batch: Mapping[str, torch.Tensor], pair: int) -> tuple[int, int]:
    """The rows (chosen, rejected) of ``pair`` in a batch of 2B sequences."""
    n = batch["input_ids"].shape[0]
    if n % 2:
        raise ValueError(f"the batch has {n} sequences; expected 2B (all chosen, then all rejected)")
    b = n // 2
    if not 0 <= pair < b:
        raise ValueError(f"pair={pair} is out of range for a batch of {b} pairs")
    return pair, b + pair
