"""The callback's in-pass measurement (``EntanglementCallback(train_every=k)``): the trainer's own micro-batches.

:class:`TrainingPass` checks at train begin that the trainer's loss can be measured inside its pass (refusing, with
the reason, what cannot), arms a :class:`~entangle.capture.inpass.PassRecorder` for every k-th optimizer step, and
when the step's backward passes are done turns their records into the ``train_pairs`` rows of that step (with each
pair's row of ``trainer.train_dataset``), a ``train_summary`` row and the scalars logged under ``entangle_train/``.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from entangle.capture.inpass import InPassError, PassRecorder, checkpointed_modules, token_keys
from entangle.capture.params import ParamSpec, select_params
from entangle.capture.sharding import check_supported
from entangle.integrations.distributed import rank_and_world
from entangle.metrics.dataset import TEXT_FIELDS, pair_texts
from entangle.metrics.summary import summarize, summary_row
from entangle.metrics.tables import summary_scalars
from entangle.metrics.train import train_pair_columns

logger = logging.getLogger(__name__)

PREFIX = "entangle_train/"


def refuse_in_pass(trainer: Any, model: torch.nn.Module) -> None:
    """Raise :class:`InPassError` (saying why) for a training setup whose pass cannot be measured per pair."""
    args = trainer.args
    reasons = []
    try:
        check_supported(model)              # FSDP1 and DeepSpeed ZeRO-3, refused as for the Monitor
    except ValueError as err:
        reasons.append(str(err))
    if getattr(args, "use_liger_kernel", False):
        reasons.append("use_liger_kernel (a fused linear cross-entropy bypasses the hooked output layer)")
    if getattr(args, "padding_free", False):
        reasons.append("padding_free (packed sequences share one row)")
    if getattr(args, "ld_alpha", None) is not None:
        reasons.append("ld_alpha (LD-DPO weights the response tokens unequally)")
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "output_router_logits", False) or getattr(trainer, "aux_loss_enabled", False):
        reasons.append("a mixture-of-experts router loss (its gradient does not go through the log-probs)")
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling",
                 "lm_head_multiplier"):
        if getattr(text, attr, None) not in (None, 1.0):
            reasons.append(f"config.{attr} (logits transformed after the output layer)")
    kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if getattr(args, "gradient_checkpointing", False) and kwargs.get("use_reentrant", False):
        reasons.append("reentrant gradient checkpointing (use_reentrant=False is supported)")
    if getattr(getattr(model, "peft_config", {}).get("default", None), "num_virtual_tokens", None):
        reasons.append("prompt-learning PEFT (virtual tokens)")
    if reasons:
        raise InPassError("in-pass capture (train_every) cannot measure this training pass: " + "; ".join(reasons))


# Dataset rows collated together when indexing them (one collator call per chunk instead of per row).
KEY_CHUNK = 64


def dataset_keys(trainer: Any) -> dict[tuple, int]:
    """(chosen token ids, rejected token ids) as the model sees them -> first row of ``trainer.train_dataset`` with
    them.

    A dataset in a layout whose collator is known (TRL DPO's ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``,
    CPO's ``chosen_input_ids`` / ``rejected_input_ids``) is read from its token columns (:func:`column_keys`), after
    the trainer's own collator gave the same keys on a sample of rows (the first ``KEY_CHUNK`` and the longest, which
    truncation would change). Otherwise the rows are collated with the trainer's collator, ``KEY_CHUNK`` at a time
    (the keys keep only the tokens the attention mask keeps, so padding to a chunk's longest row changes nothing); a
    chunk the collator refuses is collated row by row, and rows it cannot collate alone are left out."""
    data, collate = trainer.train_dataset, trainer.data_collator
    keys: dict[tuple, int] = {}
    if data is None or collate is None:
        return keys
    fast = column_keys(data, collate)
    if fast is not None:
        for i, key in enumerate(fast):
            keys.setdefault(key, i)
        return keys
    n = len(data)
    with tqdm(total=n, desc="entangle: indexing the training pairs", leave=False, disable=n < 2000) as bar:
        for start in range(0, n, KEY_CHUNK):
            rows = _rows(data, range(start, min(n, start + KEY_CHUNK)))
            for j, key in enumerate(_chunk_keys(collate, rows)):
                if key is not None:
                    keys.setdefault(key, start + j)
            bar.update(len(rows))
    return keys


# Token columns of the dataset layouts whose collators column_keys knows: TRL DPO (DataCollatorForPreference: prompt
# and response concatenated, cut to its max_length by its truncation_mode) and the CPO/ORPO layout
# (DPODataCollatorWithPadding: each sequence's ids where its attention mask is 1).
DPO_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
CPO_COLUMNS = ("chosen_input_ids", "rejected_input_ids")
# Rows of each response's longest whose column keys are checked against the collator (with the first KEY_CHUNK).
CHECK_LONGEST = 8


def column_keys(data: Any, collate: Any) -> list[tuple] | None:
    """Per row of a ``datasets.Dataset``, its (chosen, rejected) key read from its token columns as its collator
    forms them, without collating; None where the layout is not one of those known, or where the collator's own
    keys of the checked rows (the first ``KEY_CHUNK`` and the ``CHECK_LONGEST`` longest of each response) differ."""
    names = set(getattr(data, "column_names", None) or ())
    if not hasattr(data, "select_columns") or len(data) == 0:
        return None
    if names.issuperset(DPO_COLUMNS):
        cut = _truncation(collate)
        if cut is None:
            return None
        cols = data.with_format(None).select_columns(list(DPO_COLUMNS))[:]
        keys = [(tuple(cut(p + c)), tuple(cut(p + r)))
                for p, c, r in zip(*(cols[k] for k in DPO_COLUMNS), strict=True)]
    elif names.issuperset(CPO_COLUMNS):
        masks = [f"{k.split('_')[0]}_attention_mask" for k in CPO_COLUMNS]
        read = list(CPO_COLUMNS) + [m for m in masks if m in names]
        cols = data.with_format(None).select_columns(read)[:]

        def kept(ids: list, mask: list | None) -> tuple:
            return tuple(ids) if mask is None else tuple(t for t, m in zip(ids, mask, strict=True) if m)

        sides = [[kept(ids, mask) for ids, mask in zip(cols[k], cols.get(m) or [None] * len(cols[k]), strict=True)]
                 for k, m in zip(CPO_COLUMNS, masks, strict=True)]
        keys = list(zip(*sides, strict=True))
    else:
        return None
    check = set(range(min(len(keys), KEY_CHUNK)))
    for side in (0, 1):
        check.update(heapq.nlargest(CHECK_LONGEST, range(len(keys)), key=lambda i: len(keys[i][side])))
    check = sorted(check)
    if _chunk_keys(collate, _rows(data, check)) != [keys[i] for i in check]:
        logger.debug("entangle: the collator's keys differ from the dataset's token columns; collating every row")
        return None
    return keys


def _truncation(collate: Any):
    """The cut TRL's ``DataCollatorForPreference`` applies to a prompt+response (its ``max_length`` and
    ``truncation_mode``), None for an unknown mode."""
    limit, mode = getattr(collate, "max_length", None), getattr(collate, "truncation_mode", "keep_start")
    if limit is None:
        return lambda ids: ids
    if mode == "keep_start":
        return lambda ids: ids[:limit]
    if mode == "keep_end":
        return lambda ids: ids[-limit:]
    return None


def _rows(data: Any, indices: range | list[int]) -> list:
    """Rows ``indices`` of a dataset as a list of rows (one read of a ``datasets.Dataset``, whose slices are
    columns)."""
    if hasattr(data, "column_names"):
        chunk = data[indices.start:indices.stop] if isinstance(indices, range) else data[list(indices)]
        if isinstance(chunk, dict):
            return [dict(zip(chunk, values, strict=True)) for values in zip(*chunk.values(), strict=True)]
    return [data[i] for i in indices]


def _chunk_keys(collate: Any, rows: list) -> list:
    """:func:`pair_keys` of ``rows`` collated together, or row by row if that fails (None for a row that fails)."""
    try:
        keys = pair_keys(collate(rows))
        if keys is not None and len(keys) == len(rows):
            return keys
    except Exception:  # noqa: BLE001 - a chunk the collator refuses: row by row below
        pass
    out = []
    for row in rows:
        try:
            keys = pair_keys(collate([row]))
        except Exception:  # noqa: BLE001 - a row the collator needs company for: left unindexed
            keys = None
        out.append(keys[0] if keys else None)
    return out


def pair_keys(batch: dict) -> list[tuple] | None:
    """Per pair, the (chosen, rejected) token ids of a batch from a preference collator: TRL's DPO layout
    (``input_ids`` [2B, T], the B chosen sequences then their B rejected ones) or the CPO/ORPO layout
    (``chosen_input_ids`` / ``rejected_input_ids`` [B, T]); None for another layout."""
    if "input_ids" in batch and batch["input_ids"].shape[0] % 2 == 0:
        seqs = token_keys(batch["input_ids"], batch.get("attention_mask"))
        b = len(seqs) // 2
        return list(zip(seqs[:b], seqs[b:], strict=True))
    if "chosen_input_ids" in batch and "rejected_input_ids" in batch:
        chosen = token_keys(batch["chosen_input_ids"], batch.get("chosen_attention_mask"))
        rejected = token_keys(batch["rejected_input_ids"], batch.get("rejected_attention_mask"))
        return list(zip(chosen, rejected, strict=True))
    return None


class TrainingPass:
    """In-pass measurement of every ``every``-th optimizer step of ``trainer`` (see the module docstring)."""

    def __init__(self, trainer: Any, model: torch.nn.Module, every: int, *, params: ParamSpec = None,
                 method: str = "auto", strict: bool = False):
        refuse_in_pass(trainer, model)
        self.trainer, self.every, self.strict = trainer, every, strict
        named = select_params(model, params)
        self.recorder = PassRecorder(model, named, mode=method, checkpointed=checkpointed_modules(model),
                                     strict=strict)
        self.keys = dataset_keys(trainer)
        self.rank = rank_and_world()[0]
        self.step: int | None = None
        self._recording = None

    def close(self) -> None:
        self.recorder.close()

    def texts(self) -> pd.DataFrame | None:
        """The ``pairs_text`` table of the training dataset (None if it has no prompt/chosen/rejected text)."""
        data = self.trainer.train_dataset
        names = getattr(data, "column_names", None) or []
        if not all(f in names for f in TEXT_FIELDS):
            return None
        columns = data.select_columns(list(TEXT_FIELDS))
        # one conversion of the columns (reading a datasets.Dataset row by row costs ~0.1 ms a row)
        return pair_texts(columns.to_list() if hasattr(columns, "to_list") else columns)

    def begin_step(self, step: int) -> None:
        """Arm the recorder if ``step`` is measured (called at the step's beginning)."""
        if step % self.every == 0 and self._recording is None:
            self.step = step
            self._recording = self.recorder.recording()
            self._recording.__enter__()

    def end_step(self, lr: float) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """Disarm; the step's ``train_pairs`` columns and its ``train_summary`` row (as arrays and a dict: a callback
        holds them until it writes them, and builds one frame then), None if nothing was recorded."""
        if self._recording is None:
            return None
        records = self.recorder.records
        self._recording.__exit__(None, None, None)
        self._recording = None
        for err in self.recorder.errors:
            logger.warning("entangle: in-pass measurement of step %s failed: %s", self.step, err)
        self.recorder.errors.clear()
        columns = self._columns(records, lr) if records else None
        if rank_and_world()[1] == 1:
            return None if columns is None else (columns, summary_row(self.step, columns))
        # every rank takes part in the gathering, even one that recorded nothing (a collective)
        frame = gather_frames(None if columns is None else pd.DataFrame(columns))
        if frame is None:
            return None
        return {c: frame[c].to_numpy() for c in frame.columns}, summarize(frame).to_dict("records")[0]

    def _columns(self, records: list, lr: float) -> dict[str, np.ndarray]:
        """The ``train_pairs`` columns of one step's records (micro-batches in order)."""
        def halves(get):         # per pair: (chosen, rejected) of every micro-batch, in order
            parts = [get(r).numpy() for r in records]
            return (np.concatenate([x[:len(x) // 2] for x in parts]), np.concatenate([x[len(x) // 2:] for x in parts]))

        sizes = [len(r.inner) for r in records]
        excluded = halves(lambda r: r.excluded)
        return train_pair_columns(
            step=self.step, rank=self.rank, micro=np.repeat(np.arange(len(records)), sizes),
            pair=np.concatenate([np.arange(b) for b in sizes]),
            index=[self.keys.get(key, -1) for r in records for key in r.keys],
            logps=halves(lambda r: r.logps), lengths=halves(lambda r: r.lengths), coef=halves(lambda r: r.coef),
            norm2=halves(lambda r: r.norm2), inner=np.concatenate([r.inner.numpy() for r in records]),
            excluded=excluded[0] | excluded[1], lr=lr, pairs_in_step=sum(sizes))

    @staticmethod
    def scalars(summary: Mapping[str, Any]) -> dict[str, float]:
        return summary_scalars(summary, PREFIX)


def gather_frames(frame: pd.DataFrame | None) -> pd.DataFrame | None:
    """Under torch.distributed, every rank's rows (each rank measures its own micro-batches; a rank without rows
    gives None); else ``frame``. None if no rank has rows."""
    world = rank_and_world()[1]
    if world == 1:
        return frame
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, frame)
    parts = [p for p in parts if p is not None]
    return pd.concat(parts, ignore_index=True) if parts else None
