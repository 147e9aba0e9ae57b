"""Where a probe's reference log-probs come from: one policy for the Monitor (and so the callback) and checkpoint
analysis.

:func:`reference_source` decides, in this order:

* ``"given"`` — log-probs passed explicitly (``ref_logps=[...]``), or TRL's precomputed ``ref_chosen_logps`` /
  ``ref_rejected_logps`` columns on every probe row (when no reference model is given);
* ``"initial"`` — ``ref_logps="initial"``: the policy's own log-probs now, before training (TRL's
  ``precompute_ref_log_probs`` without a reference model);
* ``"model"`` — a separate reference model (``ref_model=``);
* ``"peft"`` — a PEFT policy is its own reference with its adapters disabled, or with its ``"ref"`` adapter when
  it has one, as TRL does;
* ``"none"`` — the objective needs no reference.

An objective that needs a reference and has none of these raises :class:`ReferenceError`; checkpoint analysis
catches it and falls back to the first checkpoint of the series.

:func:`reference_logps` computes given log-probs for pairs under a reference model, optionally on transformed
prompts: E-RLHF's safety-prefixed reference is DPO with ``ref_logps=reference_logps(..., prompt_transform=prefix)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from entangle.capture.engine import measurement_mode
from entangle.capture.logprobs import on_device, sequence_logps
from entangle.capture.params import unwrap_model
from entangle.data import encode_pairs

PromptTransform = str | Callable[[Any], Any]

REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
SOURCES = ("given", "initial", "model", "peft", "none")


class ReferenceError(ValueError):
    """An objective needs reference log-probs and none can be had."""


def is_peft(model: torch.nn.Module) -> bool:
    """A PEFT model (adapters that can be disabled)."""
    inner = unwrap_model(model)
    return hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config")


def has_ref_columns(rows: Any) -> bool:
    """Every row carries TRL's precomputed reference log-prob columns."""
    return isinstance(rows, Sequence) and bool(rows) and all(
        isinstance(r, Mapping) and all(k in r for k in REF_FIELDS) for r in rows)


def reference_source(needs_ref: bool, *, peft: bool = False, ref_model: Any = None, ref_logps: Any = None,
                     rows: Sequence[Mapping] | None = None, objective_name: str = "the objective") -> str:
    """One of :data:`SOURCES` (see the module docstring) for a policy that is a PEFT model (``peft``, see
    :func:`is_peft`) or not; raises :class:`ReferenceError` when ``needs_ref`` and none can be had, and
    ``ValueError`` for a ``ref_logps`` string other than ``"initial"``."""
    if isinstance(ref_logps, str):
        if ref_logps != "initial":
            raise ValueError(f"ref_logps must be log-probs or 'initial', not {ref_logps!r}")
        return "initial"
    if ref_logps is not None or (ref_model is None and has_ref_columns(rows)):
        return "given"
    if ref_model is not None:
        return "model"
    if not needs_ref:
        return "none"
    if peft:
        return "peft"
    raise ReferenceError(f"objective {objective_name!r} needs reference log-probs: pass ref_model=, ref_logps= "
                         "(or 'initial'), or use a PEFT model (reference = adapters disabled)")


def given_logps(rows: Sequence[Mapping], ref_logps: Any, pairs: Sequence[int]) -> torch.Tensor:
    """The given reference log-probs [2b] of the pairs ``pairs`` (chosen then rejected), float64: from
    ``ref_logps`` [2B] of all ``len(rows)`` pairs, else from the rows' TRL columns."""
    n_pairs = len(rows)
    idx = torch.tensor(list(pairs), dtype=torch.long)
    if ref_logps is None:
        return torch.tensor([float(rows[i][f]) for f in REF_FIELDS for i in pairs], dtype=torch.float64)
    ref = torch.as_tensor(ref_logps, dtype=torch.float64).flatten()
    if ref.numel() != 2 * n_pairs:
        raise ValueError(f"ref_logps has {ref.numel()} values for {n_pairs} probe pairs "
                         f"(expected {2 * n_pairs}: chosen then rejected)")
    return torch.cat([ref[idx], ref[n_pairs + idx]])


@contextlib.contextmanager
def peft_reference(model: torch.nn.Module) -> Iterator[None]:
    """The reference of a PEFT policy, as TRL uses it: its ``"ref"`` adapter if any, else adapters disabled."""
    model = unwrap_model(model)
    if "ref" in model.peft_config:
        previous = model.active_adapter
        model.set_adapter("ref")
        try:
            yield
        finally:
            model.set_adapter(previous)
    else:
        with model.disable_adapter():
            yield


def probe_logps(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed response log-probs [2b] (float64, CPU) of an encoded batch under ``model``: forward only, on the
    model's device, with RNG, train/eval mode and ``requires_grad`` left as found."""
    model = unwrap_model(model)
    with preserved_rng(), measurement_mode(model, []), torch.no_grad():
        return sequence_logps(model, on_device(batch, model)).detach().to(torch.float64).cpu()


def transformed_prompt(prompt: Any, transform: PromptTransform) -> Any:
    """``transform(prompt)``, or for a string ``transform`` that prefix prepended to the prompt (to a standard prompt's
    text, or to the content of a conversational prompt's first user message)."""
    if callable(transform):
        return transform(prompt)
    if isinstance(prompt, str):
        return transform + prompt
    user = next((i for i, m in enumerate(prompt) if m.get("role") == "user"), None)
    if user is None:
        raise ValueError("a conversational prompt without a user message: pass a callable prompt transform")
    return [{**m, "content": transform + m["content"]} if i == user else m for i, m in enumerate(prompt)]


def reference_logps(ref_model: torch.nn.Module, tokenizer: Any, rows: Sequence[Mapping], *,
                    prompt_transform: PromptTransform | None = None, **encode_kwargs: Any) -> torch.Tensor:
    """Reference log-probs [2B] (chosen, then rejected; float64, CPU) of the rows' responses under ``ref_model``,
    each prompt first passed through ``prompt_transform``.

    With a safety prefix this is E-RLHF's reference π_ref(y | prefix + x): DPO whose reference conditions on a
    safety-prefixed prompt is plain DPO with these reference log-probs, so pass them as ``ref_logps=`` (to
    ``Monitor``/``EntanglementCallback``, ``pair_frame``, ``pairwise_normalized_backward``). ``rows`` are
    ``{"prompt", "chosen", "rejected"}`` pairs (``load_pairs``); ``encode_kwargs`` go to ``encode_pairs``
    (``max_length``, ...). A PEFT policy's own reference: call inside ``peft_reference(model)``.
    """
    if prompt_transform is not None:
        rows = [{**row, "prompt": transformed_prompt(row["prompt"], prompt_transform)} for row in rows]
    return probe_logps(ref_model, encode_pairs(tokenizer, rows, **encode_kwargs))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Fork the CPU RNG and the RNG of every initialised CUDA device."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else []
    with torch.random.fork_rng(devices=devices):
        yield
