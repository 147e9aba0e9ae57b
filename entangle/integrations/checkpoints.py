"""Checkpoint analysis: measure a probe set of pairs on every saved checkpoint of a training run.

::

    analyze("out/dpo-run", "probe.jsonl", objective="sigmoid", beta=0.1)   # -> out/dpo-run/entangle-analysis

measures each ``checkpoint-N`` folder of a transformers/TRL output directory in step order with :class:`Monitor`,
so the result is the same run directory (``pairs``, ``summary``, ``layers`` tables and ``manifest.json``) that
:class:`EntanglementCallback` writes during training, and ``entangle report`` reads both alike.

- Checkpoints: full ones (``config.json`` + weights, or + ``pytorch_model_fsdp_0/``, the
  ``torch.distributed.checkpoint`` folder accelerate's FSDP plugin writes with ``SHARDED_STATE_DICT``: read whole in
  one process, whatever the world size that saved it) and PEFT adapter ones (``adapter_config.json``; the base model
  is ``base_model_name_or_path``, the adapters are loaded trainable so ``params=None`` measures them). A directory
  that is itself one model is a series of one. The step is ``trainer_state.json``'s ``global_step``, else the
  number in the folder name (0 for a single model).
- Tokenizer: ``tokenizer=`` when given, else the checkpoint's own, the run directory's, or the base model's.
- Reference (for objectives that need one): ``ref_model=``, else for PEFT checkpoints the base model with its
  adapters disabled (as TRL does), else the first checkpoint of the series, which the manifest says.
- Predicted changes are scaled by the learning rate the trainer logged at that step (``trainer_state.json``), else 1.
- Resumable: steps whose tables are already in ``out`` are not measured again. A checkpoint that cannot be loaded
  or measured (half-written, truncated weights, missing config, ...) is logged by name, listed under ``skipped``
  in the manifest and passed over; only a series of which nothing could be measured raises.
- Under ``torchrun`` / ``accelerate launch`` the checkpoints are split across processes (rank r takes every
  world-th one); each process measures all probe pairs of its checkpoints and writes their step parts, and rank 0
  gathers the skip reports and writes the manifest.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from entangle.capture.params import ParamSpec
from entangle.data import encode_pairs, with_pad_token
from entangle.integrations.distributed import broadcast_from_main, gather_to_main, rank_and_world, shard
from entangle.integrations.monitor import Monitor
from entangle.integrations.probe import probe_rows
from entangle.integrations.reference import ReferenceError, probe_logps, reference_source
from entangle.metrics import resolve_objective
from entangle.runio import RunWriter, read_manifest

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
DEFAULT_OUT = "entangle-analysis"
TABLES = ("pairs", "summary", "layers")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
SOURCE = "entangle analyze"
# accelerate's FSDP plugin with state_dict_type SHARDED_STATE_DICT saves the model here (torch.distributed.checkpoint)
FSDP_SHARDED = "pytorch_model_fsdp_0"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Checkpoint:
    """One saved model of a series: its training step and folder."""

    step: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_peft(self) -> bool:
        """An adapter checkpoint (``adapter_config.json``) rather than a full model."""
        return (self.path / "adapter_config.json").is_file()


def find_checkpoints(run_dir: str | os.PathLike) -> list[Checkpoint]:
    """The ``checkpoint-*`` folders of ``run_dir`` in step order, or ``run_dir`` itself when it is one model.

    Raises ``FileNotFoundError`` when ``run_dir`` does not exist and ``ValueError`` when it holds neither.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    found = [(p, m) for p in run_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_DIR.match(p.name))]
    if found:
        series = [Checkpoint(_trainer_step(p, int(m.group(1))), p) for p, m in found]
    elif (run_dir / "config.json").is_file() or (run_dir / "adapter_config.json").is_file():
        series = [Checkpoint(_trainer_step(run_dir, 0), run_dir)]
    else:
        raise ValueError(f"no checkpoints in {str(run_dir)!r}: no checkpoint-* folders, and it is not a model "
                         "directory (no config.json or adapter_config.json)")
    return sorted(series, key=lambda c: (c.step, c.name))


def checkpoints_for_rank(series: list[Checkpoint], rank: int, world: int) -> list[Checkpoint]:
    """The checkpoints process ``rank`` of ``world`` measures: every ``world``-th one, starting at ``rank``."""
    return [series[i] for i in shard(len(series), rank, world)]


def _trainer_state(path: Path) -> dict:
    """``trainer_state.json`` of a checkpoint folder; ``{}`` when absent or unreadable (half-written)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _trainer_step(path: Path, default: int) -> int:
    step = _trainer_state(path).get("global_step")
    return int(step) if isinstance(step, int) else default


def _learning_rate(ckpt: Checkpoint) -> float:
    """The learning rate the trainer logged at (or last before) the checkpoint's step: the one its next update
    uses. 1 when the checkpoint has no ``trainer_state.json`` log."""
    logged = [h for h in _trainer_state(ckpt.path).get("log_history", [])
              if isinstance(h, dict) and "learning_rate" in h and h.get("step", 0) <= ckpt.step]
    return float(logged[-1]["learning_rate"]) if logged else 1.0


# ---- loading -----------------------------------------------------------------------------------------------

def _base_model_name(ckpt: Checkpoint) -> str:
    config = json.loads((ckpt.path / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError("adapter_config.json names no base_model_name_or_path")
    return str(base)


def load_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of ``ckpt`` in eval mode on ``device``: ``AutoModelForCausalLM``, or for an adapter checkpoint its
    base model with the adapters loaded trainable (``PeftModel.from_pretrained(..., is_trainable=True)``)."""
    from transformers import AutoModelForCausalLM

    if ckpt.is_peft:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(_base_model_name(ckpt))
        model = PeftModel.from_pretrained(base, str(ckpt.path), is_trainable=True)
    elif (ckpt.path / "config.json").is_file():
        sharded = ckpt.path / FSDP_SHARDED
        if not any((ckpt.path / name).is_file() for name in WEIGHT_FILES) and (sharded / ".metadata").is_file():
            model = load_sharded_checkpoint(ckpt.path, sharded)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(ckpt.path))
    else:
        raise FileNotFoundError("no config.json or adapter_config.json (a half-written checkpoint?)")
    return model.to(device).eval()


def load_sharded_checkpoint(path: Path, sharded: Path) -> torch.nn.Module:
    """The whole model of a checkpoint saved by accelerate's FSDP plugin with ``state_dict_type:
    SHARDED_STATE_DICT``: ``config.json`` and a ``torch.distributed.checkpoint`` folder holding ``{"model":
    state_dict}`` as every rank's shards. Read in this process alone (``no_dist``), whatever the world size that
    saved it; every parameter must be in the checkpoint (a tied one through the parameter it shares)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = dcp.FileSystemReader(str(sharded))
    saved = {k[len("model."):]: m for k, m in reader.read_metadata().state_dict_metadata.items()
             if k.startswith("model.")}
    dtypes = [m.properties.dtype for m in saved.values() if hasattr(m, "properties") and m.properties.dtype.is_floating_point]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)),
                                             dtype=dtypes[0] if dtypes else None)
    state = model.state_dict()
    wanted = {k: v for k, v in state.items() if k in saved}
    loaded = {v.data_ptr() for v in wanted.values()}
    missing = [k for k, v in state.items() if k not in saved and v.data_ptr() not in loaded]
    if missing or not wanted:
        raise ValueError(f"{sharded.name} holds no tensor for {missing[:5] or 'any parameter'} of "
                         f"{type(model).__name__} (not a model saved by accelerate's FSDP plugin?)")
    with warnings.catch_warnings():        # "torch.distributed is ... uninitialized, ... a single process": meant
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({"model": wanted}, storage_reader=reader, no_dist=True)
    return model


def _load_reference(ref: str | os.PathLike, device: str | torch.device) -> torch.nn.Module:
    """A reference model from a local directory (full or adapter) or a hub name."""
    if Path(ref).is_dir():
        return load_checkpoint(Checkpoint(0, Path(ref)), device)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ref)).to(device).eval()


def _looks_local(name: str | os.PathLike) -> bool:
    """A path rather than a hub name (``model`` or ``org/model``)."""
    text = str(name)
    return isinstance(name, os.PathLike) or text.startswith((".", "/", "~")) or text.count("/") > 1 \
        or Path(text).exists()


def _has_tokenizer(source: str | Path) -> bool:
    path = Path(source)
    return not path.is_dir() or any((path / f).is_file() for f in TOKENIZER_FILES)


class _Tokenizers:
    """Finds and caches the tokenizer of each checkpoint (explicit, checkpoint, run directory, base model)."""

    def __init__(self, run_dir: Path, explicit: Any):
        self.run_dir, self.explicit = run_dir, explicit
        self.cache: dict[str, Any] = {}

    def __call__(self, ckpt: Checkpoint) -> Any:
        """The tokenizer for ``ckpt``, with a pad token."""
        if self.explicit is not None and not isinstance(self.explicit, str | os.PathLike):
            return with_pad_token(self.explicit, "the given tokenizer")
        candidates = [self.explicit] if self.explicit is not None else \
            [ckpt.path, self.run_dir] + ([_base_model_name(ckpt)] if ckpt.is_peft else [])
        errors = []
        for source in map(str, candidates):
            if source in self.cache:
                return self.cache[source]
            if not _has_tokenizer(source):
                continue
            try:
                from transformers import AutoTokenizer

                tokenizer = with_pad_token(AutoTokenizer.from_pretrained(source), source)
            except (OSError, ValueError) as e:
                errors.append(f"{source}: {_reason(e)}")
                continue
            self.cache[source] = tokenizer
            return tokenizer
        tried = "; ".join(errors) if errors else "none found"
        raise FileNotFoundError(f"no tokenizer in the checkpoint, the run directory or the base model ({tried}); "
                                "pass tokenizer= (--tokenizer)")


# ---- reference log-probs -----------------------------------------------------------------------------------

class _Reference:
    """Reference log-probs [2B] of the probe (chosen then rejected), computed once per probe encoding.

    The policy is the Monitor's (:func:`entangle.integrations.reference.reference_source`) with one addition for a
    series: ``kind`` is ``None`` (the objective needs none), ``"model"`` (``ref_model=``), ``"peft"`` (adapter
    checkpoints: adapters disabled, left to ``Monitor``) or, where the Monitor would have no reference, ``"first"``
    (the first loadable full checkpoint of the series).
    """

    def __init__(self, needs_ref: bool, ref_model: Any, series: list[Checkpoint], rows: list[dict],
                 max_length: int | None, device: str | torch.device):
        self.ref_model, self.series, self.rows, self.max_length, self.device = \
            ref_model, series, rows, max_length, device
        try:                                      # an adapter series' policies are PEFT models
            source = reference_source(needs_ref, peft=all(c.is_peft for c in series), ref_model=ref_model,
                                      rows=rows) if needs_ref else "none"
        except ReferenceError:
            source = "first"
        self.kind = {"none": None, "given": None}.get(source, source)
        self.first: Checkpoint | None = None
        self.cache: dict[str, torch.Tensor] = {}

    def describe(self, previous: str | None = None) -> str | None:
        """The reference in words, for the manifest; ``previous`` is kept when this process did not need to find
        the first loadable checkpoint (every step was measured before)."""
        if self.kind == "model":
            return str(self.ref_model) if isinstance(self.ref_model, str | os.PathLike) else type(self.ref_model).__name__
        if self.kind == "peft":
            return "the base model with the adapters disabled"
        if self.kind == "first":
            if self.first is None and previous is not None:
                return previous
            first = self.first or next(c for c in self.series if not c.is_peft)
            return (f"{first.name} (step {first.step}): the first checkpoint of the series, not necessarily the "
                    "model training started from (pass ref_model= / --ref-model for that)")
        return None

    def logps(self, ckpt: Checkpoint, model: torch.nn.Module, tokenizer: Any) -> torch.Tensor | None:
        """Reference log-probs for measuring ``ckpt`` (``None`` when none are needed or ``Monitor`` takes the PEFT
        model with adapters disabled); ``model`` is the loaded ``ckpt``, used directly when it is the reference."""
        if self.kind is None or self.kind == "peft" or (ckpt.is_peft and self.kind == "first"):
            return None
        batch = encode_pairs(tokenizer, self.rows, max_length=self.max_length)
        key = hashlib.sha256(b"".join(batch[k].numpy().tobytes() for k in sorted(batch))).hexdigest()
        if key not in self.cache:
            self.cache[key] = probe_logps(self._model(ckpt, model), batch)
        return self.cache[key]

    def _model(self, ckpt: Checkpoint, model: torch.nn.Module) -> torch.nn.Module:
        if self.kind == "model":
            ref = self.ref_model
            return _load_reference(ref, self.device) if isinstance(ref, str | os.PathLike) else ref
        errors = []
        for candidate in (c for c in self.series if not c.is_peft):
            if candidate == ckpt:
                self.first = ckpt
                return model
            try:
                ref = load_checkpoint(candidate, self.device)
            except Exception as e:  # a corrupt first checkpoint: the next one is the reference
                errors.append(f"{candidate.name}: {_reason(e)}")
                continue
            self.first = candidate
            return ref
        raise ValueError(f"no checkpoint could be loaded as the reference ({'; '.join(errors)})")


# ---- the analysis ------------------------------------------------------------------------------------------

def _bars_off(progress: bool, main: bool) -> bool | None:
    """tqdm's ``disable``: off when not wanted or not on rank 0, else ``None`` (shown on a terminal only)."""
    return True if not progress or not main else None


def _reason(err: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _done_steps(writer: RunWriter) -> set[int]:
    """Steps whose tables are all written (a step interrupted between tables is measured again)."""
    return set.intersection(*(set(writer.steps(t)) for t in TABLES))


def _open_out(out: Path, settings: dict[str, Any], rank: int) -> RunWriter:
    """The writer of ``out``, after rank 0 has checked that this analysis may add to it and recorded its settings
    (before any process writes a part). Every rank raises when it may not: ``out`` holds tables of another
    analysis or of a live run."""
    error = None
    if rank == 0:
        previous = read_manifest(out).get("analysis")
        changed = sorted(k for k in settings if previous.get(k) != settings[k]) if previous is not None else []
        if previous is None and any((out / t).is_dir() for t in TABLES):
            error = f"{str(out)!r} already holds a run directory not written by {SOURCE}; choose another out directory"
        elif changed:
            error = (f"{str(out)!r} holds an analysis with other settings ({', '.join(changed)}); "
                     "choose another out directory or delete it")
        else:
            RunWriter(out).write_manifest({"source": SOURCE, "analysis": settings})
    error = broadcast_from_main(error)
    if error is not None:
        raise ValueError(error)
    return RunWriter(out)


def analyze(
    run_dir: str | os.PathLike,
    data: Any,
    *,
    out: str | os.PathLike | None = None,
    objective: Any = "sigmoid",
    ref_model: str | os.PathLike | torch.nn.Module | None = None,
    params: ParamSpec = None,
    max_pairs: int | None = None,
    max_length: int | None = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    **hyper: Any,
) -> Path:
    """Measure the probe ``data`` on every checkpoint of ``run_dir``; return the run directory written (``out``).

    Args:
        run_dir: a transformers/TRL ``output_dir`` with ``checkpoint-*`` folders, or one model directory.
        data: probe preference pairs (a file or rows; anything :func:`entangle.data.load_pairs` accepts).
        out: the run directory to write; default ``run_dir/entangle-analysis``. Steps already there are skipped.
        objective: the loss whose entanglement is analysed (name, callable or list; ``resolve_objective``).
        ref_model: reference model (a directory, hub name or module) for objectives that need one; default:
            adapters disabled for PEFT checkpoints, else the first loadable checkpoint of the series.
        params: measured parameters (``select_params`` spec: regex, ``"lora"``, ...); default all trainable.
        max_pairs: measure only the first ``max_pairs`` pairs of ``data``.
        max_length: probe truncation, as TRL's ``max_length``.
        tokenizer: a tokenizer or its directory/name; default: the checkpoint's, the run directory's or the base
            model's.
        device: where to measure; default CUDA when available.
        progress: show tqdm bars (overall, and one per checkpoint) when stderr is a terminal.
        hyper: hyper-parameters of the objective (``beta=0.1``).

    Raises ``FileNotFoundError``/``ValueError`` (``PairError`` for bad data) for unusable arguments, and
    ``ValueError`` when no checkpoint of the series could be measured.
    """
    objective_ = resolve_objective(objective)
    unknown = sorted(set(hyper) - objective_.hyper_names)
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for objective {objective_.name!r}; "
                         f"it accepts {sorted(objective_.hyper_names) or 'none'}")
    run_dir = Path(run_dir)
    series = find_checkpoints(run_dir)
    if isinstance(ref_model, str | os.PathLike) and _looks_local(ref_model) and not Path(ref_model).is_dir():
        raise FileNotFoundError(f"reference model directory {str(ref_model)!r} does not exist")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    if isinstance(data, str | os.PathLike) and not Path(data).is_file():
        raise FileNotFoundError(f"data file {str(data)!r} does not exist")
    rows = probe_rows(data)[:max_pairs]
    if not rows:
        raise ValueError("the probe set is empty")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out) if out is not None else run_dir / DEFAULT_OUT
    reference = _Reference(objective_.needs_ref, ref_model, series, rows, max_length, device)
    settings = json.loads(json.dumps({
        "run_dir": str(run_dir.resolve()), "objective": objective_.name, "hyper": {**objective_.defaults, **hyper},
        "params": repr(params), "max_length": max_length,
        "reference": f"model {reference.describe()}" if reference.kind == "model" else reference.kind,
        "probe_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest(),
    }, default=str))
    rank, world = rank_and_world()
    writer = _open_out(out, settings, rank)

    done, tokenizers, skipped = _done_steps(writer), _Tokenizers(run_dir, tokenizer), []
    owner: dict[int, Checkpoint] = {}
    for ckpt in series:
        owner.setdefault(ckpt.step, ckpt)
    for ckpt in tqdm(checkpoints_for_rank(series, rank, world), desc="checkpoints", unit="ckpt",
                     disable=_bars_off(progress, rank == 0)):
        if ckpt.step in done:
            continue
        if owner[ckpt.step] is not ckpt:
            reason = f"step {ckpt.step} is also {owner[ckpt.step].name}'s"
        else:
            reason = _measure_checkpoint(ckpt, rows, objective_, reference, tokenizers, writer, rank == 0, world,
                                         params=params, max_length=max_length, device=device, progress=progress,
                                         **hyper)
        if reason is not None:
            logger.warning("entangle: skipping %s: %s", ckpt.path, reason)
            skipped.append({"checkpoint": ckpt.name, "step": ckpt.step, "path": str(ckpt.path), "reason": reason})

    reports = gather_to_main(skipped)     # also the barrier: every rank has written its parts
    error = None
    if reports is not None:
        skipped = sorted((s for part in reports for s in part), key=lambda s: (s["step"], s["checkpoint"]))
        measured = sorted(_done_steps(writer))
        writer.write_manifest({
            "source": SOURCE, "model": str(run_dir), "objective": objective_.name, "hyper": settings["hyper"],
            "reference": reference.describe(read_manifest(out).get("reference")), "world_size": world,
            "measured_steps": measured, "skipped": skipped,
            "checkpoints": [{"checkpoint": c.name, "step": c.step, "kind": "peft" if c.is_peft else "full",
                             "path": str(c.path), "learning_rate": _learning_rate(c)} for c in series],
        })
        if not measured:
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            error = (f"no checkpoint of {str(run_dir)!r} could be measured: "
                     f"{skipped[0]['checkpoint']}: {skipped[0]['reason']}{more}")
    error = broadcast_from_main(error)
    if error is not None:
        raise ValueError(error)
    return out


def _measure_checkpoint(ckpt: Checkpoint, rows: list[dict], objective: Any, reference: _Reference,
                        tokenizers: _Tokenizers, writer: RunWriter, main: bool, world: int, *, params: ParamSpec,
                        max_length: int | None, device: str | torch.device, progress: bool, **hyper: Any) -> str | None:
    """Load, measure and write one checkpoint; ``None`` on success, else why it was skipped."""
    model = monitor = None
    stages = tqdm(total=3, desc=ckpt.name, unit="stage", leave=False, disable=_bars_off(progress, main))
    try:
        stages.set_postfix_str("load")
        model = load_checkpoint(ckpt, device)
        tokenizer = tokenizers(ckpt)
        stages.update()
        stages.set_postfix_str("reference")
        ref = reference.logps(ckpt, model, tokenizer)
        stages.update()
        stages.set_postfix_str("measure")
        # each process measures whole checkpoints of its own: no collective inside the monitor;
        # rank 0's monitor also records the model, probe and versions in the manifest
        monitor = Monitor(model, tokenizer, rows, objective, out_dir=writer, params=params, ref_logps=ref,
                          max_length=max_length, strict=True, adam=False, distributed=False, manifest=main, **hyper)
        monitor.measure(ckpt.step, lr=_learning_rate(ckpt))
        stages.update()
        return None
    except Exception as e:  # never let one checkpoint end the series
        logger.debug("entangle: %s failed", ckpt.path, exc_info=True)
        return _reason(e)
    finally:
        stages.close()
        del model, monitor
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
