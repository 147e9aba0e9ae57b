"""The probe set a Monitor measures: its rows, this process's share of them, their encoding and preferences."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from entangle.capture.logprobs import on_device
from entangle.data import TOKEN_FIELDS, encode_pairs, load_pairs
from entangle.integrations.distributed import shard

logger = logging.getLogger(__name__)

PREF_COLUMN = "pref_prob"


def probe_rows(probe: Any) -> list[dict]:
    """Probe pairs as rows: TRL-tokenised rows (``prompt_ids``/``chosen_ids``/``rejected_ids``) are kept as they
    are, anything else goes through :func:`entangle.data.load_pairs`."""
    if isinstance(probe, Sequence) and probe and all(isinstance(r, Mapping) and all(k in r for k in TOKEN_FIELDS)
                                                      for r in probe):
        return [dict(r) for r in probe]
    return load_pairs(probe)


class Probe:
    """A fixed set of preference pairs, of which process ``rank`` of ``world`` measures every ``world``-th.

    Attributes:
        rows: every pair's row; ``n_pairs`` their number.
        pairs: the global pair ids this process measures.
        batch: their encoding (as TRL's DPOTrainer tokenises, see ``encode_pairs``), ``None`` when this process
            has no pair.
        sha256: a digest of the rows (for the manifest).
    """

    def __init__(self, probe: Any, tokenizer: Any, *, max_length: int | None = None,
                 truncation: str = "keep_start", rank: int = 0, world: int = 1):
        self.rows = probe_rows(probe)
        self.n_pairs = len(self.rows)
        if self.n_pairs == 0:
            raise ValueError("the probe set is empty")
        self.tokenizer = tokenizer
        self.encoding = {"max_length": max_length, "truncation": truncation}
        self.pairs = shard(self.n_pairs, rank, world)
        self.batch = self.encode(self.pairs) if self.pairs else None
        self.sha256 = hashlib.sha256(json.dumps(self.rows, sort_keys=True, default=str).encode()).hexdigest()

    def encode(self, pairs: Sequence[int]) -> dict[str, torch.Tensor]:
        """The encoded batch of the pairs ``pairs`` (global ids, in that order)."""
        return encode_pairs(self.tokenizer, [self.rows[i] for i in pairs], **self.encoding)

    def on(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """This process's batch on ``model``'s device."""
        return on_device(self.batch, model)

    def preferences(self, column: str | None, beta: float | None, objective_name: str
                    ) -> tuple[str | None, np.ndarray | None]:
        """The preference column and its values [b] for this process's pairs, or ``(None, None)``.

        ``column`` names a probe column with each pair's probability that the chosen response is preferred
        (default: ``"pref_prob"`` when every row has it). The idealized ranking accuracy it feeds needs ``beta``.
        An explicitly named column that is missing, not a probability, or useless without ``beta`` raises.
        """
        explicit = column is not None
        col = column if explicit else PREF_COLUMN
        if not all(col in r for r in self.rows):
            if explicit:
                missing = [i for i, r in enumerate(self.rows) if col not in r]
                raise ValueError(f"pref_col={col!r}: probe rows {missing[:10]} have no such column")
            return None, None
        if beta is None:
            if explicit:
                raise ValueError(f"pref_col={col!r}: idealized ranking accuracy needs beta, and objective "
                                 f"{objective_name!r} has none")
            logger.info("entangle: probe column %r ignored: objective %r has no beta", col, objective_name)
            return None, None
        try:
            values = np.array([float(r[col]) for r in self.rows], dtype=float)
        except (TypeError, ValueError) as e:
            raise ValueError(f"pref_col={col!r}: probe values must be probabilities ({e})") from None
        bad = np.flatnonzero(~((values >= 0) & (values <= 1)))
        if len(bad):
            raise ValueError(f"pref_col={col!r} must be a probability in [0, 1]; probe pairs {bad[:10].tolist()} "
                             "are not")
        return col, values[self.pairs]
