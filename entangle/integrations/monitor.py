"""Monitor: measure a fixed probe set of preference pairs during training, without changing the training.

The monitor wires the toolkit together: the probe (``probe.Probe``), where its reference log-probs come from
(``reference``, shared with checkpoint analysis), one measurement pass (``entangle.capture.measure``), the tables
and scalars built from it (``entangle.metrics``), the collectives across ranks (``distributed.collective``) and the
run directory (``entangle.runio.RunWriter``). It holds two pieces of state: the last measurement
(:class:`LastMeasurement`, for ``pred_gradient`` and token maps) and a pending update check (:class:`UpdateCheck`,
between ``before_update`` and ``after_update``).
It works in a hand-written PyTorch loop::

    monitor = Monitor(model, tokenizer, probe_rows, objective="sigmoid", ref_model=ref, beta=0.1, out_dir="runs/x")
    for step, batch in enumerate(loader):
        loss = ...; loss.backward()
        if step % 10 == 0:
            monitor.measure(step, optimizer=opt)   # Gram, per-pair frame, summary, layers (at θ_t)
            monitor.before_update(step)            # snapshot θ_t
        opt.step()
        if step % 10 == 0:
            monitor.after_update(step)             # Δθ, observed vs predicted change of the probe log-probs
        opt.zero_grad()

or, cheaper, with the measurement and the update check from one forward and backward pass at θ_t (the same
numbers; ``after_update`` then writes and returns both)::

        if step % 10 == 0:
            monitor.before_update(step, optimizer=opt, measure=True)   # snapshot θ_t, Adam's geometry, the lr
        opt.step()
        if step % 10 == 0:
            monitor.after_update(step)             # measurement of θ_t + observed vs predicted change

``EntanglementCallback`` drives the same object from trainer events (the second way). Every method leaves parameters,
``.grad``, optimizer state, RNG state (CPU and CUDA), train/eval mode and ``requires_grad`` exactly as found.

Under ``torch.distributed`` (DDP via torchrun / accelerate) each rank measures every ``world``-th probe pair and
rank 0 gathers the rows and writes the run directory; all ranks return the same scalars. The batch view
(``batch_dlogp_*``, ``pred_gradient``) then covers the pairs of one rank: the cross-rank Gram blocks are not computed.
A model sharded by ``torch.distributed.fsdp.fully_shard`` (FSDP2) is measured the same way: the per-example products
are local to the rank holding the sequences, and the sharded Adam state and update are gathered one parameter at a
time (every rank calls every method in the same order, as the trainer's events do; each needs a probe pair). Under
DeepSpeed ZeRO-1/2 the parameters are whole and the measurement is DDP's, without the Adam view (partitioned flat
state); ``FullyShardedDataParallel`` (FSDP1) and ZeRO-3 are refused at construction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import pandas as pd
import torch

import entangle
from entangle.capture.logprobs import on_device, response_lengths
from entangle.capture.measure import STRUCTURES, measure, update_dot
from entangle.capture.optim import adam_preconditioner
from entangle.capture.params import ParamSpec, parameters_at, select_params, unwrap_model
from entangle.capture.result import Measurement, View
from entangle.capture.sharding import check_supported, model_is_sharded, reshard, zero_optimizer
from entangle.integrations.distributed import (
    broadcast_from_main,
    check_every_rank_measures,
    collective,
    rank_and_world,
)
from entangle.integrations.probe import Probe
from entangle.integrations.reference import (
    given_logps,
    is_peft,
    peft_reference,
    preserved_rng,
    probe_logps,
    reference_source,
)
from entangle.metrics import batch_weights, pair_frame, resolve_objective, summarize
from entangle.metrics.objectives import check_hyper
from entangle.metrics.tables import (
    concat_frames,
    extreme_pairs,
    layer_frame,
    summary_scalars,
    update_frame,
    update_scalars,
)
from entangle.runio import RunWriter

logger = logging.getLogger(__name__)

PREFIX = "entangle/"


@dataclass
class LastMeasurement:
    """The last measurement: its step, this rank's batch view ``lr · K c`` [2b] (the ``pred_gradient`` of the
    update of that step) and, on rank 0, the ``pairs`` table of all ranks (to pick pairs for token maps)."""

    step: int
    batch_dlogp: np.ndarray
    pairs: pd.DataFrame | None = None


@dataclass
class UpdateCheck:
    """An update in progress: θ_step snapshot before ``optimizer.step()``; with ``measure``, also what the
    measurement of ``step`` needs from before the step (Adam's preconditioner and the learning rate)."""

    step: int
    before: dict[str, torch.Tensor]
    measure: bool = False
    preconditioner: dict[str, torch.Tensor] | None = None
    lr: float = 1.0


class Monitor:
    """Measures gradient entanglement on a fixed probe set of pairs at chosen training steps.

    Args:
        model: the trained causal LM (plain, PEFT, DDP-wrapped, or sharded by ``fully_shard``).
        tokenizer: its tokenizer (needs a pad token); the probe is tokenised as TRL's DPOTrainer does.
        probe: preference pairs in any format :func:`entangle.data.load_pairs` accepts, or TRL-tokenised rows.
            Rows carrying ``ref_chosen_logps``/``ref_rejected_logps`` (TRL's precomputed columns) give the
            reference log-probs.
        objective: objective name, callable or list (see ``entangle.metrics.resolve_objective``).
        out_dir: run directory (tables + manifest), or a :class:`~entangle.runio.RunWriter` to write through;
            ``None`` writes nothing.
        params: measured parameters (see ``entangle.capture.params.select_params``); default all trainable.
        ref_model: reference model for objectives that need reference log-probs.
        ref_logps: [2B] reference log-probs of the probe (chosen then rejected), or ``"initial"``: the model's
            own log-probs now, at construction (TRL's ``precompute_ref_log_probs`` without a reference model).
            Without either, a PEFT model is its own reference with adapters disabled (or with its ``"ref"``
            adapter when there is one, as TRL does). See :mod:`entangle.integrations.reference`.
        max_length, truncation: probe truncation, as TRL's ``max_length`` / ``truncation_mode``.
        strict: re-raise exceptions from measurements instead of logging them and going on.
        loss_weights: weights of a list ``objective``.
        method: Gram method of ``entangle.capture.measure``.
        structure: ``"pairs"`` (default) measures what the tables need, each pair's norms and inner product and
            the batch view ``K c``, with per-example products linear in the probe size; ``"full"`` forms the whole
            probe Gram matrix (quadratic; same tables).
        adam: also measure in Adam's preconditioned geometry when an Adam/AdamW optimizer with state is given.
        fixed_reference: the reference does not change during training (TRL's default), so its probe log-probs
            are computed once; ``False`` recomputes them at every measurement (e.g. TRL's ``sync_ref_model``).
        distributed: split the probe across the default process group and gather on rank 0 (the default);
            ``False`` makes this process measure every pair on its own (e.g. one checkpoint per process).
        pref_col: a probe column holding each pair's probability that the chosen response is preferred (e.g. the
            share of annotators who preferred it). It becomes a column of the ``pairs`` table and gives the
            summary's ``idealized_ranking_accuracy`` and ``ranking_accuracy_gap`` (THEORY.md §8; they need
            reference log-probs and ``beta``). Default: ``"pref_prob"`` when every probe row has it.
        manifest: record the model, objective, probe and versions in the run directory's manifest (``False``: the
            caller's process writes tables only, e.g. one of several processes analysing checkpoints).
        hyper: hyper-parameters of the objective (``beta=0.1``); a keyword the objective does not declare raises
            here, at construction.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        probe: Any,
        objective: Any = "sigmoid",
        out_dir: str | os.PathLike | RunWriter | None = None,
        params: ParamSpec = None,
        ref_model: torch.nn.Module | None = None,
        ref_logps: torch.Tensor | Sequence[float] | str | None = None,
        max_length: int | None = None,
        strict: bool = False,
        *,
        truncation: str = "keep_start",
        loss_weights: Sequence[float] | None = None,
        method: str = "auto",
        structure: str = "pairs",
        adam: bool = True,
        distributed: bool = True,
        pref_col: str | None = None,
        fixed_reference: bool = True,
        manifest: bool = True,
        **hyper: Any,
    ):
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        self.objective = resolve_objective(objective, loss_weights)
        check_hyper(self.objective, hyper)
        self.model, self.params, self.strict, self.method, self.adam = model, params, strict, method, adam
        self.structure, self.fixed_reference, self.hyper = structure, fixed_reference, hyper
        select_params(unwrap_model(model), params)                      # a selection that selects nothing raises now
        check_supported(unwrap_model(model))                             # FSDP1 and DeepSpeed ZeRO-3 raise now
        self.rank, self.world = rank_and_world() if distributed else (0, 1)
        self.probe = Probe(probe, tokenizer, max_length=max_length, truncation=truncation, rank=self.rank,
                           world=self.world)
        self.n_pairs, self.pairs = self.probe.n_pairs, self.probe.pairs
        check_every_rank_measures(model_is_sharded(model), self.n_pairs, self.world)
        beta = {**self.objective.defaults, **hyper}.get("beta")
        self.pref_col, self._pref = self.probe.preferences(pref_col, beta, self.objective.name)
        self.ref_model = ref_model
        self.reference = reference_source(self.objective.needs_ref, peft=is_peft(model), ref_model=ref_model,
                                          ref_logps=ref_logps, rows=self.probe.rows, objective_name=self.objective.name)
        self._ref = None                                                 # local [2b] reference log-probs, once fixed
        if self.reference == "given":
            self._ref = given_logps(self.probe.rows, ref_logps, self.pairs)
        elif self.reference == "initial":
            self._ref = self._logps(self.model)
        self._last: LastMeasurement | None = None
        self._pending: UpdateCheck | None = None
        self._warned_zero = False
        if isinstance(out_dir, RunWriter):
            self.writer = out_dir if self.rank == 0 else None
        else:
            self.writer = RunWriter(out_dir) if out_dir is not None and self.rank == 0 else None
        if self.writer is not None and manifest:
            self.writer.write_manifest(self._manifest())

    # -- reference log-probs ---------------------------------------------------------------------------------
    def _reference_logps(self) -> torch.Tensor | None:
        """Local [2b] reference log-probs of the probe, or ``None`` (the objective needs none)."""
        if self._ref is not None or self.reference == "none":
            return self._ref
        if self.reference == "model":
            ref = self._logps(self.ref_model)
        else:                                                   # "peft": the policy with its adapters disabled
            with peft_reference(self.model):
                ref = self._logps(self.model)
        if self.fixed_reference:               # a frozen reference gives the same probe log-probs every time
            self._ref = ref
        return ref

    def _logps(self, model: torch.nn.Module) -> torch.Tensor | None:
        return None if self.probe.batch is None else probe_logps(model, self.probe.batch)

    # -- measurements ----------------------------------------------------------------------------------------
    def measure(self, step: int, optimizer: torch.optim.Optimizer | None = None,
                lr: float | None = None) -> dict[str, float]:
        """Measure the probe at the current parameters θ_step; write ``pairs``, ``summary``, ``layers`` (and
        ``summary_adam``) for ``step``; return the summary as scalars named ``entangle/<column>``.

        ``lr`` scales the predicted changes (default: the optimizer's first learning rate, else 1). With an
        Adam/AdamW ``optimizer`` that has state, the summary in Adam's geometry is added as ``entangle/adam/...``.
        """
        lr = _lr(optimizer) if lr is None else float(lr)
        return self._collective("measurement", step, lambda: self._measure_local(step, optimizer, lr),
                                lambda parts: self._write_measurement(step, parts))

    def _measure_local(self, step: int, optimizer: Any, lr: float) -> dict[str, pd.DataFrame] | None:
        if self.probe.batch is None:
            return None
        with preserved_rng():
            ref = self._reference_logps()
            m = self._pass(self._preconditioner(optimizer), ref)
            return self._tables(m, step, lr, ref)

    def _pass(self, preconditioner: dict[str, torch.Tensor] | None, ref: torch.Tensor | None,
              delta: dict[str, torch.Tensor] | None = None) -> Measurement:
        """One forward and backward pass over the local probe: both geometries (Adam's when a preconditioner is
        given), in the monitor's structure, and the update dots along ``delta``."""
        structure = {}
        if self.structure == "pairs":
            lengths = response_lengths(self.probe.batch)

            def weights(logps: torch.Tensor) -> torch.Tensor:
                return batch_weights(self.objective, logps, lengths, ref, **self.hyper)

            structure = {"structure": "pairs", "weights": weights}
        model = unwrap_model(self.model)
        return measure(model, self.probe.on(model), self.params, method=self.method, preconditioner=preconditioner,
                       delta=delta, **structure)

    def _tables(self, m: Measurement, step: int, lr: float, ref: torch.Tensor | None) -> dict[str, pd.DataFrame]:
        """This rank's tables of one measurement (plain view, and Adam's geometry when measured)."""
        frame = self._frame(m.plain, ref, step, lr)
        self._last = LastMeasurement(step, np.concatenate([frame["batch_dlogp_chosen"], frame["batch_dlogp_rejected"]]))
        out = {"pairs": frame, "layers": layer_frame(m.plain, step, self.pairs)}
        if m.preconditioned is not None:
            out["adam"] = self._frame(m.preconditioned, ref, step, lr)
        return out

    def _frame(self, view: View, ref: torch.Tensor | None, step: int, lr: float) -> pd.DataFrame:
        extra = {self.pref_col: self._pref} if self.pref_col is not None else {}
        frame = pair_frame(view, self.objective, ref, step=step, lr=lr, **self.hyper, **extra)
        frame["pair"] = self.pairs
        return frame

    def _summarize(self, pairs: pd.DataFrame) -> pd.DataFrame:
        """``summarize``, with the idealized ranking accuracy when there are preferences and reference log-probs."""
        if self.pref_col is None or self.pref_col not in pairs or "ref_logp_chosen" not in pairs:
            return summarize(pairs)
        return summarize(pairs, pref_col=self.pref_col, beta={**self.objective.defaults, **self.hyper}["beta"])

    def _preconditioner(self, optimizer: Any) -> dict[str, torch.Tensor] | None:
        """Adam's preconditioner per measured parameter; on a ``fully_shard`` model each one a ``DTensor`` of the
        parameter's shards (computed from the sharded state; the engine gathers one parameter at a time)."""
        if optimizer is None or not self.adam:
            return None
        zero = zero_optimizer(optimizer)
        if zero is not None:
            if not self._warned_zero:
                logger.warning("entangle: no Adam geometry under DeepSpeed ZeRO (%s keeps Adam's state as flat fp32 "
                               "partitions, not per parameter); the plain geometry and the realised update are "
                               "measured, or shard with torch.distributed.fsdp.fully_shard for the Adam view", zero)
                self._warned_zero = True
            return None
        try:
            reshard(unwrap_model(self.model))       # fully_shard: the parameters the optimizer's state is keyed by
            return adam_preconditioner(optimizer, self.model, self.params)
        except (TypeError, ValueError) as e:  # not Adam, or no state before the first step: no Adam view
            logger.debug("entangle: no Adam geometry: %s", e)
            return None

    def _write_measurement(self, step: int, parts: list[dict | None]) -> dict[str, float]:
        parts = [p for p in parts if p is not None]
        pairs = concat_frames([p["pairs"] for p in parts], "pair")
        summary = self._summarize(pairs)
        if self._last is None or self._last.step != step:      # this rank measured no pair
            self._last = LastMeasurement(step, np.empty(0))
        self._last.pairs = pairs
        scalars = summary_scalars(summary, PREFIX)
        tables = {"pairs": pairs, "summary": summary, "layers": concat_frames([p["layers"] for p in parts], "pair")}
        if all("adam" in p for p in parts):
            tables["summary_adam"] = self._summarize(concat_frames([p["adam"] for p in parts], "pair"))
            scalars |= summary_scalars(tables["summary_adam"], PREFIX + "adam/")
        self._write(tables, step)
        return scalars

    def _write(self, tables: dict[str, pd.DataFrame], step: int) -> None:
        if self.writer is not None:
            for name, table in tables.items():
                self.writer.write(name, table, step)

    # -- the realised update ---------------------------------------------------------------------------------
    def before_update(self, step: int, optimizer: torch.optim.Optimizer | None = None, measure: bool = False,
                      lr: float | None = None) -> None:
        """Snapshot the measured parameters θ_step; call right before ``optimizer.step()``.

        ``measure=True`` defers :meth:`measure` of ``step`` to :meth:`after_update`, which then takes the Gram
        views from the same forward and backward pass at θ_step as the update prediction (one pass instead of
        two). What the measurement needs from before the step is read now: Adam's preconditioner (of the
        ``optimizer``'s state before the step, as :meth:`measure` would use it) and the learning rate ``lr``.
        """
        self._pending = None
        try:
            model = unwrap_model(self.model)
            reshard(model)                          # fully_shard: snapshot the shards the optimizer updates
            named = select_params(model, self.params)
            check = UpdateCheck(step, {n: p.detach().clone() for n, p in named}, measure)
            if measure:
                check.preconditioner = self._preconditioner(optimizer)
                check.lr = _lr(optimizer) if lr is None else float(lr)
            self._pending = check
        except Exception:
            if self.strict:
                raise
            logger.exception("entangle: snapshot before the update of step %d failed", step)

    def after_update(self, step: int, optimizer: torch.optim.Optimizer | None = None,
                     lr: float | None = None) -> dict[str, float]:
        """Compare the observed change of the probe log-probs across the update of ``step`` with its first-order
        prediction <g_i(θ_step), Δθ>; write the ``updates`` table; return ``entangle/update/...`` scalars.

        ``pred_gradient`` is ``lr · (K c)_i`` from a :meth:`measure` at the same step (NaN without one): the
        change a plain gradient step on the probe's own loss would cause. After ``before_update(step,
        measure=True)`` this also is the measurement of ``step``: it writes what :meth:`measure` writes and
        returns its scalars too (``optimizer`` and ``lr`` are not used; they were read before the step).
        """
        check, self._pending = self._pending, None
        if check is None or check.step != step:
            def missing():
                raise RuntimeError(f"after_update({step}) without before_update({step})")
            return self._collective("update measurement", step, missing, lambda parts: {})
        if not check.measure:
            return self._collective("update measurement", step, lambda: self._update_local(check)[1],
                                    lambda parts: self._write_updates(step, parts))
        return self._collective("measurement", step, lambda: self._update_local(check),
                                lambda parts: self._write_measurement(step, [p[0] for p in parts])
                                | self._write_updates(step, [p[1] for p in parts]))

    def _update_local(self, check: UpdateCheck) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
        """(measurement tables or ``None``, ``updates`` table) of this rank for the update ``check``."""
        if self.probe.batch is None:
            return None, None
        model = unwrap_model(self.model)
        reshard(model)
        named = select_params(model, self.params)
        tables = None
        with preserved_rng():
            delta = {n: p.detach().to(_wide(p)) - check.before[n].to(_wide(p)) for n, p in named}
            after = self._logps(model)
            with parameters_at(named, check.before):
                if check.measure:                # the measurement of θ_step and the prediction from one pass
                    ref = self._reference_logps()
                    m = self._pass(check.preconditioner, ref, delta)
                    pred, logp_before = m.update, m.logps
                    tables = self._tables(m, check.step, check.lr, ref)
                else:
                    pred, logp_before = update_dot(model, self.probe.on(model), delta, params=self.params,
                                                   method=self.method)
        if self._last is not None and self._last.step == check.step:
            pred_gradient = self._last.batch_dlogp
        else:
            pred_gradient = np.full(len(after), np.nan)
        return tables, update_frame(logp_before.detach().cpu().numpy(), after.numpy(),
                                    pred.detach().cpu().numpy(), pred_gradient, pairs=self.pairs,
                                    n_pairs=self.n_pairs, step=check.step)

    def _write_updates(self, step: int, parts: list[pd.DataFrame | None]) -> dict[str, float]:
        updates = concat_frames(parts, "seq")
        self._write({"updates": updates}, step)
        return update_scalars(updates, PREFIX)

    # -- token maps -------------------------------------------------------------------------------------------
    def token_maps(self, step: int | None = None, pairs: Sequence[int] | None = None, which: str = "extremes",
                   method: str = "full") -> pd.DataFrame:
        """Token-level gradient maps (THEORY.md §7) of a few probe pairs; written as the ``tokens`` table.

        Args:
            step: the step to file the maps under (the model is measured as it is now); default the step of the
                last :meth:`measure`.
            pairs: probe pair ids to map (their ``which`` is ``"selected"``); default: picked by ``which`` from
                the last measurement's pairs (by gradient cosine).
            which: ``"extremes"`` (the most and the least entangled pair), ``"most"`` or ``"least"``.
            method: ``"full"`` (exact, every measured parameter) or ``"head"`` (output layer only, no backward);
                see :func:`entangle.capture.tokens.token_map`.

        Returns the frame written: the ``token_map`` columns (``pair`` = probe pair id) plus ``step``, ``which``
        and ``method``. Under ``torch.distributed`` only rank 0 computes it (the others return an empty frame),
        except on a model sharded by ``fully_shard``: there every rank must call it (each block's re-run
        all-gathers its parameters), rank 0 picks the pairs for all, every rank maps them and returns the frame, and
        rank 0 writes it. Model and training state are left as found; a failure is logged and gives an empty frame
        (raised with ``strict``).
        """
        sharded = self.world > 1 and model_is_sharded(unwrap_model(self.model))
        if self.rank != 0 and not sharded:
            return pd.DataFrame()
        try:
            return self._token_maps(step, pairs, which, method, sharded)
        except Exception:
            if self.strict:
                raise
            logger.exception("entangle: token maps at step %s failed", step)
            return pd.DataFrame()

    def _pick_token_pairs(self, step: int | None, pairs: Sequence[int] | None, which: str,
                          method: str) -> tuple[list[tuple[int, str]], int]:
        """The ``(pair, which)`` to map and the step to file them under (rank 0: it holds every rank's pairs)."""
        from entangle.capture.tokens import METHODS

        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        if pairs is None:
            if self._last is None or self._last.pairs is None:
                raise ValueError("token_maps needs a measurement first to pick pairs by cosine (or pass pairs=)")
            picked = extreme_pairs(self._last.pairs, which)
        else:
            bad = [p for p in pairs if not 0 <= int(p) < self.n_pairs]
            if bad:
                raise ValueError(f"pairs {bad} are not probe pair ids (0..{self.n_pairs - 1})")
            picked = [(int(p), "selected") for p in dict.fromkeys(pairs)]
        if step is None:
            if self._last is None:
                raise ValueError("token_maps(step=None) needs a measurement first (or pass step=)")
            step = self._last.step
        return picked, step

    def _token_maps(self, step: int | None, pairs: Sequence[int] | None, which: str, method: str,
                    sharded: bool) -> pd.DataFrame:
        from entangle.capture.tokens import token_map

        if not sharded:
            picked, step = self._pick_token_pairs(step, pairs, which, method)
        else:               # rank 0 picks for every rank; a refusal there is raised on every rank
            try:
                choice = self._pick_token_pairs(step, pairs, which, method) if self.rank == 0 else None
            except ValueError as e:
                choice = str(e)
            choice = broadcast_from_main(choice)
            if isinstance(choice, str):
                raise ValueError(choice)
            picked, step = choice
        model = unwrap_model(self.model)
        batch = on_device(self.probe.encode([p for p, _ in picked]), model)
        frames = []
        try:
            with preserved_rng():
                for j, (p, label) in enumerate(picked):
                    frame = token_map(model, batch, pair=j, params=self.params if method == "full" else None,
                                      method=method, tokenizer=self.probe.tokenizer)
                    frame["pair"] = p
                    frames.append(frame.assign(step=step, which=label, method=method))
        finally:
            if sharded:
                reshard(model)          # fully_shard: a forward without a backward leaves the root gathered
        out = pd.concat(frames, ignore_index=True)
        out = out[["step", "pair", "which", "method"] + [c for c in out.columns
                                                          if c not in ("step", "pair", "which", "method")]]
        if self.rank == 0:
            self._write({"tokens": out}, step)
        return out

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _collective(self, what: str, step: int, local, combine) -> dict[str, float]:
        return collective(what, step, local, combine, rank=self.rank, world=self.world, strict=self.strict,
                          logger=logger)

    def _manifest(self) -> dict:
        return {
            **model_manifest(self.model, self.params),
            "tokenizer": getattr(self.probe.tokenizer, "name_or_path", None),
            "objective": self.objective.name,
            "hyper": {**self.objective.defaults, **self.hyper},
            "probe": {"pairs": self.n_pairs, "sha256": self.probe.sha256, **self.probe.encoding},
            "reference": self.reference,
            "method": self.method, "world_size": self.world,
        }


def model_manifest(model: torch.nn.Module, params: ParamSpec = None) -> dict:
    """What a run's manifest says of the model measured: its name and class, the measured parameters (``params``
    spec, tensors, numel) and the versions of the packages involved."""
    model = unwrap_model(model)
    named = select_params(model, params)
    return {
        "model": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "model_class": type(model).__name__,
        "params": {"spec": repr(params), "tensors": len(named), "numel": sum(p.numel() for _, p in named)},
        "versions": {"entangle": entangle.__version__, **{k: _version(k) for k in
                                                           ("torch", "transformers", "trl", "peft", "accelerate")}},
    }


def _wide(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _lr(optimizer: Any) -> float:
    groups = getattr(optimizer, "param_groups", None)
    return float(groups[0]["lr"]) if groups else 1.0


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
