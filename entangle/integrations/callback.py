"""``EntanglementCallback``: a thin ``transformers.TrainerCallback`` adapter over :class:`Monitor`.

::

    cb = EntanglementCallback(probe=probe_rows, every=10, out_dir="runs/x")
    trainer = DPOTrainer(..., callbacks=[cb])          # or trainer.add_callback(cb), or cb.attach(trainer)

It translates trainer events into monitor calls and TRL configurations into objectives; it holds no math.

- When: at every step whose ``global_step`` (updates done so far) is a multiple of ``every`` — step 0 is the
  state at train begin — θ_t, Adam's preconditioner and the learning rate are snapshot in
  ``on_pre_optimizer_step``; in ``on_optimizer_step`` one forward and backward pass at θ_t gives the measurement
  of θ_t and the first-order prediction of the realised update, and one forward at θ_{t+1} its observed effect
  (``Monitor.before_update(step, measure=True)`` / ``after_update``). With ``check_updates=False`` the probe is
  measured in ``on_pre_optimizer_step``. The final parameters are measured at the end of training.
- What: the objective and its hyper-parameters come from a TRL trainer's config (``DPOConfig.loss_type`` and
  ``loss_weights``, ``beta``, ``label_smoothing``; CPO/SimPO and ORPO configs map to ``cpo_*``, ``simpo``,
  ``orpo``), and so does the reference (``ref_model``, precomputed reference log-probs, or a PEFT model with its
  adapters disabled). For any other trainer pass ``objective=`` (and its hyper-parameters) explicitly.
- Where: the run directory ``out_dir`` (default ``<output_dir>/entangle``), and the trainer's logs: each
  measurement's scalars are one record of their own at the step they measure, whatever ``logging_steps`` is —
  appended to ``state.log_history`` and passed to every callback's ``on_log`` (so to the ``report_to``
  integrations, which read ``state.global_step``) while ``global_step`` is still that step, as ``Trainer.log``
  does. They do not go through TRL's metric stores, which would log them at a later step averaged with the
  measurements in between.
- The trainer is found on its own when the first event fires (the callback looks for the ``Trainer`` whose
  callback list holds it); ``cb.trainer = trainer`` or ``cb.attach(trainer)`` set it explicitly.
- Sharded training: FSDP2 (accelerate's ``fsdp_version: 2``) and DeepSpeed ZeRO-1/2 are measured; FSDP1 and
  ZeRO-3 are refused at train begin.
- Mixed precision: with ``bf16=True`` accelerate wraps the model's ``forward`` in bf16 autocast, so the
  measurement's forward is the one training computes; the callback adds no autocast of its own (the engine's
  products stay float32 / float64 either way; README "Precision").
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from transformers import Trainer, TrainerCallback

from entangle.capture.params import ParamSpec
from entangle.integrations.monitor import Monitor, model_manifest
from entangle.integrations.reference import has_ref_columns
from entangle.integrations.training_pass import TrainingPass
from entangle.metrics import resolve_objective
from entangle.runio import RunWriter

logger = logging.getLogger(__name__)

# In-pass rows are written every this many measured steps (one part per table), at each checkpoint save and at the end
# of training: a part file per step would cost more than the step's measurement at small shapes.
TRAIN_WRITE_EVERY = 10

_CPO_OBJECTIVES = {"sigmoid": "cpo_sigmoid", "hinge": "cpo_hinge", "ipo": "cpo_ipo", "simpo": "simpo",
                   "alphapo": "simpo"}
_UNSUPPORTED_DPO = ("aot", "aot_unpaired")  # sorted across the batch: not a per-pair loss


def _trainer_kind(trainer: Any) -> str:
    """``"dpo"``, ``"cpo"``, ``"orpo"`` for TRL's preference trainers, else ``"plain"``."""
    names = {c.__name__ for c in type(trainer).__mro__}
    for kind, cls in (("dpo", "DPOTrainer"), ("cpo", "CPOTrainer"), ("orpo", "ORPOTrainer")):
        if cls in names:
            return kind
    return "plain"


def trl_objective(trainer: Any) -> tuple[Any, list[float] | None, dict[str, Any]]:
    """``(objective, loss_weights, hyper)`` of a TRL preference trainer, as its config defines the loss.

    Raises ``ValueError`` for configurations whose loss is not a per-pair function of the summed log-probs
    (``aot``, WPO weighting, f-divergences, LD-DPO's ``ld_alpha``, AlphaPO rewards).
    """
    args, kind = trainer.args, _trainer_kind(trainer)
    if kind == "dpo":
        types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
        bad = [t for t in types if t in _UNSUPPORTED_DPO]
        if bad or getattr(args, "use_weighting", False) or getattr(args, "ld_alpha", None) is not None \
                or getattr(args, "f_divergence_type", "reverse_kl") not in ("reverse_kl", None):
            raise ValueError(f"entangle cannot reproduce this DPO loss (loss_type={types}, use_weighting, "
                             "f_divergence_type or ld_alpha); pass objective= explicitly to measure another one")
        objective: Any = types[0] if len(types) == 1 and not args.loss_weights else types
        weights = list(args.loss_weights) if args.loss_weights else None
        hyper = {"beta": args.beta, "label_smoothing": args.label_smoothing,
                 "discopop_tau": getattr(args, "discopop_tau", None), "nll_norm": "batch"}
    elif kind == "cpo":
        if getattr(args, "alpha", 0.0):
            raise ValueError("entangle cannot reproduce AlphaPO rewards (CPOConfig.alpha != 0); pass objective=")
        objective, weights = _CPO_OBJECTIVES[args.loss_type], None
        hyper = {"beta": args.beta, "label_smoothing": args.label_smoothing, "cpo_alpha": args.cpo_alpha,
                 "simpo_gamma": args.simpo_gamma, "nll_norm": "batch"}
        if args.loss_type == "alphapo":
            hyper["cpo_alpha"] = 0.0
    elif kind == "orpo":
        objective, weights, hyper = "orpo", None, {"beta": args.beta, "nll_norm": "batch"}
    else:
        raise ValueError(f"{type(trainer).__name__} is not a TRL preference trainer: pass objective= explicitly")
    return objective, weights, hyper


class EntanglementCallback(TrainerCallback):
    """Measure gradient entanglement on a probe set during ``Trainer``/TRL training (see the module docstring).

    Args:
        probe: preference pairs (any format ``load_pairs`` accepts) or indices into ``trainer.train_dataset``;
            None: no probe (``train_every`` then says what is measured).
        objective: the loss to analyse; ``None`` reads it from a TRL trainer's config.
        every: measure the probe when ``global_step % every == 0`` (and at the end).
        train_every: also measure, on every ``train_every``-th optimizer step, the training pairs themselves inside
            the trainer's own forward and backward passes (every micro-batch; no extra pass): the ``train_pairs``
            and ``train_summary`` tables and the ``entangle_train/*`` scalars (``entangle.capture.inpass``).
        out_dir: run directory; default ``<args.output_dir>/entangle``.
        params: measured parameters (``select_params`` spec); default all trainable (the adapters under PEFT).
        strict: raise exceptions from measurements instead of logging them.
        check_updates: at each measured step also compare the realised update's first-order prediction with the
            observed change of the probe log-probs (the ``updates`` table); it shares the measurement's pass and
            adds one forward pass, which ``False`` saves.
        trainer: the trainer, if known already (else found at the first event).
        monitor_kwargs: ``max_length``, ``loss_weights``, ``ref_model``, ``ref_logps``, ``method``, ``structure``,
            ``adam`` and objective hyper-parameters (``beta=...``), passed to :class:`Monitor` (they override the
            trainer's).
    """

    def __init__(self, probe: Any = None, objective: Any = None, every: int = 10,
                 out_dir: str | os.PathLike | None = None, params: ParamSpec = None, strict: bool = False, *,
                 check_updates: bool = True, train_every: int | None = None, trainer: Trainer | None = None,
                 **monitor_kwargs: Any):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if train_every is not None and train_every < 1:
            raise ValueError(f"train_every must be >= 1, got {train_every}")
        if probe is None and train_every is None:
            raise ValueError("nothing to measure: pass a probe, or train_every=k to measure the training pairs")
        self.train_every, self.training_pass = train_every, None
        self.writer: RunWriter | None = None
        self.probe, self.objective, self.every, self.out_dir = probe, objective, every, out_dir
        self.params, self.strict, self.trainer, self.check_updates = params, strict, trainer, check_updates
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.measured: set[int] = set()
        self._update_step: int | None = None
        self._train_rows: list = []        # in-pass steps not yet written: (step, train_pairs columns, summary row)

    def attach(self, trainer: Trainer) -> EntanglementCallback:
        """Set the trainer and add this callback to it (if it is not there yet); returns ``self``."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # -- events ---------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        trainer = self._find_trainer()
        _refuse_sharded(trainer)
        self.measured.clear()
        model = model if model is not None else trainer.model
        out_dir = self.out_dir or os.path.join(args.output_dir, "entangle")
        if self.probe is not None:
            rows = self._probe_rows(trainer)
            tokenizer = processing_class if processing_class is not None else trainer.processing_class
            if tokenizer is None:
                raise ValueError("the probe's pairs are tokenised with the trainer's tokenizer, and this trainer has "
                                 "none: pass processing_class=tokenizer to it")
            self.monitor = Monitor(model, tokenizer, rows, out_dir=out_dir, params=self.params,
                                   strict=self.strict, **self._monitor_settings(trainer, rows))
            self.writer = self.monitor.writer
        elif args.process_index == 0:
            self.writer = RunWriter(out_dir)
        if self.train_every is not None:
            if self.training_pass is not None:
                self.training_pass.close()
            method = self.monitor_kwargs.get("method", "auto")
            self.training_pass = TrainingPass(trainer, model, self.train_every, params=self.params, method=method,
                                              strict=self.strict)
            if self.writer is not None:
                # what the train_pairs rows measure (with a probe, added to the monitor's manifest)
                self.writer.write_manifest({
                    **({} if self.monitor is not None else model_manifest(model, self.params)),
                    "train_pairs": {"every": self.train_every, "trainer": type(trainer).__name__,
                                    "loss_type": getattr(args, "loss_type", None),
                                    "method": method,
                                    "world_size": args.world_size}})
            texts = self.training_pass.texts()
            if self.writer is not None and texts is not None:    # the report shows the entangled pairs' text
                self.writer.write("pairs_text", texts, 0)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.training_pass is not None:
            self.training_pass.begin_step(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.training_pass is not None:       # the step's backward passes are done: before the probe's own pass
            self._end_training_pass(args, state, control, optimizer)
        if self.monitor is None or state.global_step % self.every:
            return
        step = state.global_step
        self.measured.add(step)
        if self.check_updates:      # measured in on_optimizer_step, from the pass that predicts the update
            self.monitor.before_update(step, optimizer=optimizer, measure=True)
            self._update_step = step
        else:
            self._log(args, state, control, self.monitor.measure(step, optimizer=optimizer))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.monitor is None or self._update_step is None:
            return
        step, self._update_step = self._update_step, None
        self._log(args, state, control, self.monitor.after_update(step))

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.monitor is not None and (state.global_step >= state.max_steps > 0 or control.should_training_stop):
            self._measure_final(args, state, control, optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.monitor is not None:
            self._measure_final(args, state, control, optimizer)
        self._write_train_rows()
        if self.training_pass is not None:
            self.training_pass.close()
            self.training_pass = None

    def _end_training_pass(self, args, state, control, optimizer) -> None:
        """The in-pass rows of this step: written, summarised and logged at the step they measure."""
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else float("nan")
        try:
            out = self.training_pass.end_step(lr)
        except Exception as err:  # noqa: BLE001 - reported, never raised into training unless strict
            if self.strict:
                raise
            logger.warning("entangle: in-pass measurement of step %s failed: %s", state.global_step, err)
            return
        if out is None:
            return
        columns, summary = out
        if self.writer is not None:
            self._train_rows.append((state.global_step, columns, summary))
            if len(self._train_rows) >= TRAIN_WRITE_EVERY:
                self._write_train_rows()
        self._log(args, state, control, TrainingPass.scalars(summary))

    def _write_train_rows(self) -> None:
        """Write the held ``train_pairs`` and ``train_summary`` rows as one part each (named by their first step),
        each one frame built from the held steps' columns and rows."""
        rows, self._train_rows = self._train_rows, []
        if rows and self.writer is not None:
            pairs = pd.DataFrame({c: np.concatenate([columns[c] for _, columns, _ in rows]) for c in rows[0][1]})
            self.writer.write("train_pairs", pairs, rows[0][0])
            self.writer.write("train_summary", pd.DataFrame([summary for *_, summary in rows]), rows[0][0])

    def on_save(self, args, state, control, **kwargs):
        self._write_train_rows()

    # -- helpers -------------------------------------------------------------------------------------------
    def _measure_final(self, args, state, control, optimizer) -> None:
        """The final parameters, with the Adam view of the optimizer's state after the last update."""
        if state.global_step not in self.measured:
            self.measured.add(state.global_step)
            self._log(args, state, control, self.monitor.measure(state.global_step, optimizer=optimizer))

    def _log(self, args, state, control, scalars: dict[str, float]) -> None:
        """Log one measurement's scalars as a record of their own at ``state.global_step``, the step measured.

        As ``Trainer.log`` does (on every rank; the integrations log on the main process only): the record
        ``{**scalars, "step": global_step}`` goes to ``state.log_history`` and ``scalars`` to every callback's
        ``on_log``. ``trainer.log`` itself is not called (TRL's trainers override it: DPO's would add its pending
        metrics, CPO's would file the record as an evaluation). ``CallbackHandler.on_log`` clears
        ``control.should_log``; it is restored, so the trainer still logs at its own logging steps.
        """
        if not scalars:
            return
        state.log_history.append({**scalars, "step": state.global_step})
        should_log = control.should_log
        self.trainer.callback_handler.on_log(args, state, control, logs=dict(scalars))
        control.should_log = should_log

    def _find_trainer(self) -> Trainer:
        """The trainer: set explicitly, or the ``Trainer`` up the call stack whose callbacks include ``self``."""
        if self.trainer is None:
            frame = sys._getframe(1)
            while frame is not None and self.trainer is None:
                candidate = frame.f_locals.get("self")
                if isinstance(candidate, Trainer) and self in candidate.callback_handler.callbacks:
                    self.trainer = candidate
                frame = frame.f_back
        if self.trainer is None:
            raise RuntimeError("EntanglementCallback could not find its trainer: set `cb.trainer = trainer` "
                               "or use `cb.attach(trainer)`")
        return self.trainer

    def _probe_rows(self, trainer: Trainer) -> Any:
        probe = self.probe
        if isinstance(probe, range) or (isinstance(probe, Sequence) and not isinstance(probe, str) and probe
                                        and all(isinstance(i, int) for i in probe)):
            if trainer.train_dataset is None:
                raise ValueError("probe indices need trainer.train_dataset")
            return [dict(trainer.train_dataset[int(i)]) for i in probe]
        return probe

    def _monitor_settings(self, trainer: Trainer, rows: Any) -> dict[str, Any]:
        """Objective, hyper-parameters and reference for the monitor: explicit settings over the trainer's."""
        settings = dict(self.monitor_kwargs)
        kind = _trainer_kind(trainer)
        if self.objective is None:
            objective, weights, trl_hyper = trl_objective(trainer)
            settings.setdefault("loss_weights", weights)
        else:
            objective, trl_hyper = self.objective, {}
            if kind != "plain":
                try:
                    trl_hyper = trl_objective(trainer)[2]
                except ValueError:      # a loss entangle cannot reproduce, but the user chose another one
                    trl_hyper = {"beta": trainer.args.beta}
        declared = resolve_objective(objective, settings.get("loss_weights")).hyper_names
        for key, value in trl_hyper.items():
            if key in declared and value is not None:
                settings.setdefault(key, value)
        settings["objective"] = objective
        if getattr(trainer.args, "sync_ref_model", False):   # TR-DPO: the reference moves during training
            settings.setdefault("fixed_reference", False)
        if kind == "dpo" and "ref_model" not in settings and "ref_logps" not in settings:
            if trainer.ref_model is not None:
                settings["ref_model"] = trainer.accelerator.unwrap_model(trainer.ref_model)
            elif trainer.args.precompute_ref_log_probs and not hasattr(trainer.model, "peft_config") \
                    and not has_ref_columns(rows):
                settings["ref_logps"] = "initial"   # TRL's reference is then the model before training
        return settings


def _refuse_sharded(trainer: Trainer) -> None:
    """Refuse the sharding schemes the Monitor cannot read: FSDP1 (accelerate's ``fsdp_version: 1``) and DeepSpeed
    ZeRO-3. FSDP2 (``fsdp_version: 2``, ``fully_shard``) and ZeRO-1/2 are measured (README "Sharded training")."""
    state = getattr(trainer.accelerator, "state", None)
    fsdp = getattr(state, "fsdp_plugin", None) if getattr(trainer, "is_fsdp_enabled", False) else None
    if fsdp is not None and getattr(fsdp, "fsdp_version", 1) != 2:
        raise RuntimeError("EntanglementCallback does not support FullyShardedDataParallel (FSDP1: flat parameters); "
                           "use FSDP2, torch.distributed.fsdp.fully_shard (accelerate: fsdp_version: 2; "
                           "transformers: fsdp_config={'version': 2}), DDP or a single process")
    deepspeed = getattr(state, "deepspeed_plugin", None) if getattr(trainer, "is_deepspeed_enabled", False) else None
    if deepspeed is not None and getattr(deepspeed, "zero_stage", None) == 3:
        raise RuntimeError("EntanglementCallback does not support DeepSpeed ZeRO-3 (parameters partitioned outside "
                           "the forward); use ZeRO-1/2, FSDP2 (torch.distributed.fsdp.fully_shard, accelerate: "
                           "fsdp_version: 2), DDP or a single process")
