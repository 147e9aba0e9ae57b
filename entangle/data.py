"""Preference pairs: load them from common sources and tokenise them exactly as TRL 1.16's ``DPOTrainer`` does.

A row is a dict ``{"prompt", "chosen", "rejected"}`` (plus any extra columns, kept untouched), in one of TRL's
two formats:

- standard: three strings, e.g. ``{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}``;
- conversational: three lists of ``{"role", "content"}`` messages, rendered with the tokenizer's chat template.

``load_pairs`` also accepts rows without a prompt (the shared prefix becomes the prompt, as in TRL's
``extract_prompt``) and Anthropic HH-RLHF dialogues. ``encode_pairs`` turns rows into the batch TRL's collator
builds: all B chosen sequences, then all B rejected ones, right-padded, with a mask on the response tokens.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

logger = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")
TOKEN_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
HH_HUMAN = "\n\nHuman: "
HH_ASSISTANT = "\n\nAssistant:"


class PairError(ValueError):
    """A preference pair that cannot be used as given; the message names the row and the problem."""


# ----------------------------------------------------------------------------------------------------------
# loading


def load_pairs(
    source: Any,
    *,
    split: str = "train",
    on_mismatch: Literal["warn", "skip", "error"] = "warn",
) -> list[dict]:
    """Read preference pairs from ``source`` and return rows ``{"prompt", "chosen", "rejected", ...}``.

    ``source`` is a list of dicts, a ``datasets.Dataset``, a ``DatasetDict`` (``split`` is taken), a pandas
    DataFrame, or a path to a ``.jsonl``/``.jsonl.gz``, ``.json``/``.json.gz`` (a list of rows or a dict of
    columns), ``.parquet`` or ``.csv``/``.csv.gz`` file (CSV cells are strings: standard format only). Extra columns are kept untouched. Rows in standard or conversational format are returned as they are; rows
    without ``prompt`` are split:

    - Anthropic HH-RLHF dialogues (strings starting with ``"\\n\\nHuman: "``) are split at their last
      ``"\\n\\nAssistant:"``: the prompt runs up to and including it, the response is the rest (it starts
      with a space). If the text before that point differs between chosen and rejected, the pair has no
      common prompt. ``on_mismatch`` decides: ``"warn"`` (default) skips such rows and logs one warning
      naming their indices, ``"skip"`` skips them silently, ``"error"`` raises ``PairError`` naming them.
    - other rows get the shared prefix of chosen and rejected as prompt, as TRL's ``extract_prompt`` does:
      characters for strings (a space before the first difference goes to the responses), whole messages
      for conversations. As in TRL, if one response is a prefix of the other, the last shared element stays
      in the responses.

    Raises ``PairError`` (naming the row index in ``source``) for missing fields, malformed values, empty
    responses and chosen identical to rejected; ``PairError`` naming the file and line for a JSON/JSONL file
    that is not valid JSON; ``FileNotFoundError`` naming the path when a path is not a file.
    """
    if on_mismatch not in ("warn", "skip", "error"):
        raise ValueError(f"on_mismatch must be 'warn', 'skip' or 'error', not {on_mismatch!r}")
    rows, mismatched = [], []
    for i, record in enumerate(_records(source, split)):
        if not isinstance(record, Mapping):
            raise PairError(f"row {i}: expected a mapping of columns, got {type(record).__name__}")
        row = dict(record)
        if "prompt" not in row:
            _require_fields(i, row, ("chosen", "rejected"))
            if _is_hh_dialogue(row):
                split_row = _split_hh(i, row)
                if split_row is None:
                    mismatched.append(i)
                    continue
            else:
                _check_values(i, {k: row[k] for k in ("chosen", "rejected")})
                split_row = _extract_prompt(row["chosen"], row["rejected"])
            row = {**split_row, **{k: v for k, v in row.items() if k not in split_row}}
        check_pair(i, row)
        rows.append(row)
    if mismatched:
        msg = (
            f"{len(mismatched)} HH-RLHF row(s) differ between chosen and rejected before the last "
            f"'\\n\\nAssistant:', so they have no common prompt: rows {mismatched}"
        )
        if on_mismatch == "error":
            raise PairError(msg)
        if on_mismatch == "warn":
            logger.warning("%s; skipped them (on_mismatch='skip' skips quietly, 'error' raises)", msg)
    return rows


def _records(source: Any, split: str) -> Iterable[Any]:
    """The raw records of ``source``, in order."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} " + ("is not a file" if path.exists() else "does not exist"))
        return _read_file(path)
    if isinstance(source, Mapping):  # a DatasetDict, or any dict of splits
        if split not in source:
            raise KeyError(f"split {split!r} not in source; splits present: {list(source)}")
        return _records(source[split], split)
    if isinstance(source, pd.DataFrame):
        return [{k: _unwrap_array(v) for k, v in rec.items()} for rec in source.to_dict("records")]
    return source


def _unwrap_array(value: Any) -> Any:
    """Numpy arrays (nested lists read back by pandas, e.g. message lists from Parquet) as plain lists."""
    return [_unwrap_array(v) for v in value.tolist()] if isinstance(value, np.ndarray) else value


def _read_file(path: Path) -> list[dict]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(path) as f:
            return [_json(path, line.rstrip("\r\n"), number) for number, line in enumerate(f, start=1) if line.strip()]
    if name.endswith((".json", ".json.gz")):
        with _open_text(path) as f:
            data = _json(path, f.read())
        if isinstance(data, dict):  # columns: {"prompt": [...], "chosen": [...], ...}
            return [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
        return data
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith((".csv", ".csv.gz")):
        frame = pd.read_csv(path, keep_default_na=False, dtype={k: str for k in FIELDS})
        return frame.to_dict("records")
    raise ValueError(f"{path}: unknown file type; expected .jsonl, .jsonl.gz, .json, .json.gz, .parquet or .csv")


def _json(path: Path, text: str, line: int = 1) -> Any:
    """``text`` parsed as JSON; ``PairError`` naming the file and line (``line`` = the first line of ``text``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PairError(f"{path}: line {line + e.lineno - 1}: not valid JSON ({e.msg}, column {e.colno})") from None


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz") else path.open(encoding="utf-8")


def _is_hh_dialogue(row: Mapping) -> bool:
    return all(isinstance(row[k], str) and row[k].startswith(HH_HUMAN) for k in ("chosen", "rejected"))


def _split_hh(i: int, row: Mapping) -> dict | None:
    """Split an HH-RLHF pair at the last "\\n\\nAssistant:"; None if the two dialogues differ before it."""
    parts = {}
    for key in ("chosen", "rejected"):
        prompt, sep, response = row[key].rpartition(HH_ASSISTANT)
        if not sep:
            raise PairError(f"row {i}: HH-RLHF {key!r} dialogue has no '\\n\\nAssistant:' turn")
        parts[key] = (prompt + sep, response)
    if parts["chosen"][0] != parts["rejected"][0]:
        return None
    return {"prompt": parts["chosen"][0], "chosen": parts["chosen"][1], "rejected": parts["rejected"][1]}


def _extract_prompt(chosen: Sequence, rejected: Sequence) -> dict:
    """The shared prefix of ``chosen`` and ``rejected`` as prompt, exactly as TRL's ``extract_prompt``."""
    n = min(len(chosen), len(rejected))
    idx = next((k for k in range(n) if chosen[k] != rejected[k]), None)
    if idx is None:  # one is a prefix of the other: TRL keeps the last shared element in the responses
        idx = max(n - 1, 0)
    elif idx > 0 and chosen[idx - 1] == " ":  # the space before the first difference goes to the responses
        idx -= 1
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


# ----------------------------------------------------------------------------------------------------------
# validation


def check_pair(i: int, row: Mapping) -> None:
    """Raise ``PairError`` naming row ``i`` unless it is a usable standard or conversational pair.

    A response is empty only if it is ``""`` (or all its messages have ``""`` content): a whitespace-only
    response is kept, as TRL keeps it (it is still followed by EOS or the template's end-of-turn tokens).
    """
    _require_fields(i, row, FIELDS)
    _check_values(i, {k: row[k] for k in FIELDS})
    for key in ("chosen", "rejected"):
        if _is_empty(row[key]):
            raise PairError(f"row {i}: {key!r} response is empty")
    if row["chosen"] == row["rejected"]:
        raise PairError(f"row {i}: 'chosen' and 'rejected' are identical, so the pair carries no preference")


def _require_fields(i: int, row: Mapping, fields: Sequence[str]) -> None:
    missing = [k for k in fields if k not in row]
    if missing:
        raise PairError(f"row {i}: missing field(s) {missing}; columns present: {list(row)}")


def _check_values(i: int, values: Mapping[str, Any]) -> None:
    """All strings (standard format) or all message lists (conversational format)."""
    for key, value in values.items():
        if not isinstance(value, (str, list)):
            raise PairError(
                f"row {i}: {key!r} is {type(value).__name__}; expected a string (standard format) "
                "or a list of {'role', 'content'} messages (conversational format)"
            )
    strings = [k for k, v in values.items() if isinstance(v, str)]
    if len(strings) == len(values):
        return
    if strings:
        lists = [k for k in values if k not in strings]
        raise PairError(
            f"row {i}: {strings[0]!r} is a string but {lists[0]!r} is a message list; "
            "use one format (standard or conversational) in every field"
        )
    for key, value in values.items():
        for k, message in enumerate(value):
            if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)):
                raise PairError(f"row {i}: {key!r} message {k} is not a {{'role', 'content'}} dict: {message!r}")
            if not isinstance(message.get("content"), str):
                raise PairError(
                    f"row {i}: {key!r} message {k} has content of type {type(message.get('content')).__name__}, "
                    "expected a string"
                )


def _is_empty(response: str | list) -> bool:
    if isinstance(response, str):
        return response == ""
    return all(message["content"] == "" for message in response)


def is_conversational(row: Mapping) -> bool:
    """True if the row's prompt is a list of messages (TRL's conversational format)."""
    return isinstance(row.get("prompt"), list)


# ----------------------------------------------------------------------------------------------------------
# tokenisation


def tokenize_pair(tokenizer: Any, i: int, row: Mapping) -> tuple[list[int], list[int], list[int]]:
    """Token ids ``(prompt, chosen, rejected)`` of row ``i``, as TRL 1.16's ``DPOTrainer._prepare_dataset``.

    Standard rows: EOS is appended to each response (unless it already ends with it), and ``prompt`` and
    ``prompt + response`` are tokenised with ``tokenizer(text=...)`` (special tokens such as BOS included).
    Conversational rows: the prompt is rendered with ``add_generation_prompt=True``, prompt + response without
    it (``tools`` and ``chat_template_kwargs`` columns are passed on). The responses start where the
    tokenised prompt and both tokenised prompt + response sequences stop agreeing, so a prompt tail that the
    template or a merge across the boundary changes is dropped. Rows with ``prompt_ids``, ``chosen_ids`` and
    ``rejected_ids`` (TRL's processed dataset) are taken as they are.
    """
    if all(k in row for k in TOKEN_FIELDS):
        return tuple(list(row[k]) for k in TOKEN_FIELDS)
    check_pair(i, row)
    if is_conversational(row):
        if tokenizer.chat_template is None:
            raise PairError(f"row {i}: conversational row but the tokenizer has no chat template")
        tools = row.get("tools")
        kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools, **row.get("chat_template_kwargs", {})}
        prompt = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True, **kwargs)
        full = [_chat_ids(tokenizer, row["prompt"] + row[k], **kwargs) for k in ("chosen", "rejected")]
    else:
        eos = tokenizer.eos_token
        if eos is None:
            raise PairError("the tokenizer has no eos_token, which TRL appends to every standard-format response")
        prompt = tokenizer(text=row["prompt"])["input_ids"]
        full = [tokenizer(text=row["prompt"] + _with_eos(row[k], eos))["input_ids"] for k in ("chosen", "rejected")]
    n = min(_common_prefix_length(prompt, ids) for ids in full)
    return prompt[:n], full[0][n:], full[1][n:]


def _chat_ids(tokenizer: Any, messages: list, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def with_pad_token(tokenizer: Any, source: str = "the model") -> Any:
    """``tokenizer`` with its EOS token as pad token when it has none (logged), as TRL users usually set it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {source} has neither a pad nor an eos token; add a pad token to it")
        tokenizer.pad_token = tokenizer.eos_token
        logger.warning("entangle: the tokenizer of %s has no pad token; using its eos token %r for padding",
                       source, tokenizer.eos_token)
    return tokenizer


def encode_pairs(
    tokenizer: Any,
    rows: Sequence[Mapping],
    max_length: int | None = None,
    truncation: Literal["keep_start", "keep_end"] = "keep_start",
    max_prompt_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise B pairs into the batch TRL 1.16's ``DataCollatorForPreference`` builds.

    Returns int64 tensors of shape [2B, L]: rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected,
    right-padded with ``tokenizer.pad_token_id``; L is the longest sequence after truncation.

    - ``input_ids``: token ids;
    - ``attention_mask``: 1 on real tokens, 0 on padding;
    - ``completion_mask``: 1 exactly on response tokens (including the appended EOS), 0 on prompt and padding.

    Each sequence is cut to ``max_length`` tokens independently: ``"keep_start"`` (TRL's default) drops its
    end, ``"keep_end"`` its start. ``max_prompt_length`` (not a TRL 1.16 option; older TRL cut prompts this
    way) first keeps only the last ``max_prompt_length`` prompt tokens. ``PairError`` names the row if a
    response is entirely truncated away (TRL silently drops such rows) or would start at position 0, where
    no token precedes it to condition on.
    """
    if tokenizer.pad_token_id is None:
        raise PairError("the tokenizer has no pad token; set one, e.g. `tokenizer.pad_token = tokenizer.eos_token`")
    if truncation not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation must be 'keep_start' or 'keep_end', not {truncation!r}")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number of tokens, not {value}")
    pairs = [tokenize_pair(tokenizer, i, row) for i, row in enumerate(rows)]
    seqs = []  # (token ids, completion mask), all chosen first, then all rejected
    for which, column in (("chosen", 1), ("rejected", 2)):
        for i, pair in enumerate(pairs):
            prompt, response = pair[0], pair[column]
            if max_prompt_length is not None:
                prompt = prompt[-max_prompt_length:]
            seqs.append(_sequence(i, which, prompt, response, max_length, truncation))
    length = max(len(ids) for ids, _ in seqs)
    batch = {
        "input_ids": torch.full((len(seqs), length), tokenizer.pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(seqs), length, dtype=torch.long),
        "completion_mask": torch.zeros(len(seqs), length, dtype=torch.long),
    }
    for n, (ids, mask) in enumerate(seqs):
        batch["input_ids"][n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        batch["attention_mask"][n, : len(ids)] = 1
        batch["completion_mask"][n, : len(ids)] = torch.tensor(mask, dtype=torch.long)
    return batch


def _sequence(
    i: int, which: str, prompt: list[int], response: list[int], max_length: int | None, truncation: str
) -> tuple[list[int], list[int]]:
    """Prompt + response ids and their completion mask, truncated to ``max_length`` and checked."""
    if not response:
        raise PairError(f"row {i}: {which!r} response tokenises to no tokens")
    ids, mask = prompt + response, [0] * len(prompt) + [1] * len(response)
    if max_length is not None:
        cut = slice(None, max_length) if truncation == "keep_start" else slice(-max_length, None)
        ids, mask = ids[cut], mask[cut]
    if not any(mask):
        raise PairError(
            f"row {i}: {which!r} response entirely removed by truncation: the prompt is {len(prompt)} tokens "
            f"and max_length={max_length} (truncation={truncation!r})"
        )
    if mask[0]:
        cause = (
            f"truncation={truncation!r} to max_length={max_length} removed the whole prompt"
            if prompt
            else "no prompt token precedes the response (the prompt is empty and the tokenizer adds no BOS, "
            "or its last token merges into the response)"
        )
        raise PairError(
            f"row {i}: {which!r} response would start at position 0, with no token to condition on: {cause}"
        )
    return ids, mask
