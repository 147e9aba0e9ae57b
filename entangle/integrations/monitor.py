"""Monitor: measure a fixed probe set of preference pairs during training, without changing the training.

The monitor wires the toolkit together; all mathematics lives in ``entangle.capture`` and ``entangle.metrics``.
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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import pandas as pd
import torch

import entangle
from entangle.capture.engine import STRUCTURES, measurement_mode, sequence_gram, update_dot
from entangle.capture.logprobs import response_lengths, sequence_logps
from entangle.capture.optim import adam_preconditioner
from entangle.capture.params import ParamSpec, parameters_at, select_params, unwrap_model
from entangle.capture.result import GramResult
from entangle.data import TOKEN_FIELDS, encode_pairs, load_pairs
from entangle.integrations.distributed import broadcast_from_main, gather_to_main, rank_and_world, shard
from entangle.metrics import batch_weights, pair_frame, resolve_objective, summarize
from entangle.runio import RunWriter

logger = logging.getLogger(__name__)

PREFIX = "entangle/"
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
UPDATE_COLUMNS = ("step", "seq", "pair", "side", "logp_before", "logp_after", "observed", "pred_update",
                  "pred_gradient")
LAYER_COLUMNS = ("step", "pair", "layer", "inner", "norm2_chosen", "norm2_rejected", "cosine")


def probe_rows(probe: Any) -> list[dict]:
    """Probe pairs as rows: TRL-tokenised rows (``prompt_ids``/``chosen_ids``/``rejected_ids``) are kept as they
    are, anything else goes through :func:`entangle.data.load_pairs`."""
    if isinstance(probe, Sequence) and probe and all(isinstance(r, Mapping) and all(k in r for k in TOKEN_FIELDS)
                                                      for r in probe):
        return [dict(r) for r in probe]
    return load_pairs(probe)


def layer_frame(gram: GramResult, step: int, pairs: Sequence[int]) -> pd.DataFrame:
    """One row per (pair, layer) of the within-pair Gram blocks of ``gram.blocks("layer")``."""
    blocks = gram.blocks("layer")
    if not blocks:
        return pd.DataFrame(columns=list(LAYER_COLUMNS))
    B = gram.n_pairs
    k = torch.arange(B)
    stacked = torch.stack([b.detach().to(torch.float64).cpu() for b in blocks.values()])   # [layers, 2B, 2B]
    inner, n_w, n_l = stacked[:, k, B + k], stacked[:, k, k], stacked[:, B + k, B + k]     # [layers, B]
    return pd.DataFrame({
        "step": step, "pair": np.tile(np.asarray(pairs), len(blocks)), "layer": np.repeat(list(blocks), B),
        "inner": inner.flatten().numpy(), "norm2_chosen": n_w.flatten().numpy(),
        "norm2_rejected": n_l.flatten().numpy(), "cosine": (inner / (n_w * n_l).sqrt()).flatten().numpy(),
    })


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Fork the CPU RNG and the RNG of every initialised CUDA device."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else []
    with torch.random.fork_rng(devices=devices):
        yield


class Monitor:
    """Measures gradient entanglement on a fixed probe set of pairs at chosen training steps.

    Args:
        model: the trained causal LM (plain, PEFT, or DDP-wrapped).
        tokenizer: its tokenizer (needs a pad token); the probe is tokenised as TRL's DPOTrainer does.
        probe: preference pairs in any format :func:`entangle.data.load_pairs` accepts, or TRL-tokenised rows.
            Rows carrying ``ref_chosen_logps``/``ref_rejected_logps`` (TRL's precomputed columns) give the
            reference log-probs.
        objective: objective name, callable or list (see ``entangle.metrics.resolve_objective``).
        out_dir: run directory (tables + manifest); ``None`` writes nothing.
        params: measured parameters (see ``entangle.capture.params.select_params``); default all trainable.
        ref_model: reference model for objectives that need reference log-probs.
        ref_logps: [2B] reference log-probs of the probe (chosen then rejected), or ``"initial"``: the model's
            own log-probs now, at construction (TRL's ``precompute_ref_log_probs`` without a reference model).
            Without either, a PEFT model is its own reference with adapters disabled (or with its ``"ref"``
            adapter when there is one, as TRL does).
        max_length, truncation: probe truncation, as TRL's ``max_length`` / ``truncation_mode``.
        strict: re-raise exceptions from measurements instead of logging them and going on.
        loss_weights: weights of a list ``objective``.
        method: Gram method of ``sequence_gram``.
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
        hyper: hyper-parameters of the objective (``beta=0.1``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        probe: Any,
        objective: Any = "sigmoid",
        out_dir: str | os.PathLike | None = None,
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
        **hyper: Any,
    ):
        self.model, self.params, self.strict, self.method, self.adam = model, params, strict, method, adam
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        self.structure = structure
        self.fixed_reference = fixed_reference
        self.objective = resolve_objective(objective, loss_weights)
        self.hyper = hyper
        self.rank, self.world = rank_and_world() if distributed else (0, 1)
        rows = probe_rows(probe)
        self.n_pairs = len(rows)
        if self.n_pairs == 0:
            raise ValueError("the probe set is empty")
        self.pairs = shard(self.n_pairs, self.rank, self.world)      # global pair ids measured by this rank
        local = [rows[i] for i in self.pairs]
        self.batch = encode_pairs(tokenizer, local, max_length=max_length, truncation=truncation) if local else None
        self.tokenizer, self._rows = tokenizer, rows
        self._encoding = {"max_length": max_length, "truncation": truncation}
        self.pref_col, self._pref = self._preferences(rows, pref_col)
        self._last: tuple[int, pd.DataFrame] | None = None          # (step, pairs table) of the last measurement
        self.ref_model = ref_model
        self._ref = self._initial_reference(rows, ref_logps)
        self._before: dict[str, torch.Tensor] | None = None
        self._before_step: int | None = None
        self._deferred: tuple[dict[str, torch.Tensor] | None, float] | None = None  # (Adam's P, lr), measure=True
        self._pre: tuple[int, np.ndarray] | None = None             # (step, lr · K c) of the last measurement
        self.writer = RunWriter(out_dir) if out_dir is not None and self.rank == 0 else None
        if self.writer is not None:
            self.writer.write_manifest(self._manifest(rows, tokenizer, max_length, truncation))

    # -- preference probabilities -----------------------------------------------------------------------------
    def _preferences(self, rows: list[dict], pref_col: str | None) -> tuple[str | None, np.ndarray | None]:
        """The preference column and its local values [b] (float), or ``(None, None)``."""
        explicit = pref_col is not None
        col = pref_col if explicit else "pref_prob"
        if not all(col in r for r in rows):
            if explicit:
                missing = [i for i, r in enumerate(rows) if col not in r]
                raise ValueError(f"pref_col={col!r}: probe rows {missing[:10]} have no such column")
            return None, None
        beta = {**self.objective.defaults, **self.hyper}.get("beta")
        if beta is None:
            if explicit:
                raise ValueError(f"pref_col={col!r}: idealized ranking accuracy needs beta, and objective "
                                 f"{self.objective.name!r} has none")
            logger.info("entangle: probe column %r ignored: objective %r has no beta", col, self.objective.name)
            return None, None
        try:
            values = np.array([float(r[col]) for r in rows], dtype=float)
        except (TypeError, ValueError) as e:
            raise ValueError(f"pref_col={col!r}: probe values must be probabilities ({e})") from None
        bad = np.flatnonzero(~((values >= 0) & (values <= 1)))
        if len(bad):
            raise ValueError(f"pref_col={col!r} must be a probability in [0, 1]; probe pairs {bad[:10].tolist()} "
                             "are not")
        return col, values[self.pairs]

    # -- reference log-probs ---------------------------------------------------------------------------------
    def _initial_reference(self, rows: list[dict], ref_logps: Any) -> torch.Tensor | None:
        """Local [2b] reference log-probs when they are fixed now; ``None`` when computed per measurement."""
        if isinstance(ref_logps, str):
            if ref_logps != "initial":
                raise ValueError(f"ref_logps must be log-probs or 'initial', not {ref_logps!r}")
            return self._logps(self.model)
        if ref_logps is not None:
            ref = torch.as_tensor(ref_logps, dtype=torch.float64).flatten()
            if ref.numel() != 2 * self.n_pairs:
                raise ValueError(f"ref_logps has {ref.numel()} values for {self.n_pairs} probe pairs "
                                 f"(expected {2 * self.n_pairs}: chosen then rejected)")
            idx = torch.tensor(self.pairs, dtype=torch.long)
            return torch.cat([ref[idx], ref[self.n_pairs + idx]])
        if self.ref_model is None and all(all(k in r for k in REF_FIELDS) for r in rows):
            return torch.tensor([float(rows[i][f]) for f in REF_FIELDS for i in self.pairs], dtype=torch.float64)
        if self.objective.needs_ref and self.ref_model is None and not _is_peft(self.model):
            raise ValueError(f"objective {self.objective.name!r} needs reference log-probs: pass ref_model=, "
                             "ref_logps= (or 'initial'), or use a PEFT model (reference = adapters disabled)")
        return None

    def _reference(self) -> torch.Tensor | None:
        if self._ref is not None:
            return self._ref
        ref = None
        if self.ref_model is not None:
            ref = self._logps(self.ref_model)
        elif self.objective.needs_ref:
            with _peft_reference(unwrap_model(self.model)):
                ref = self._logps(self.model)
        if self.fixed_reference:               # a frozen reference gives the same probe log-probs every time
            self._ref = ref
        return ref

    def _logps(self, model: torch.nn.Module) -> torch.Tensor | None:
        """Summed response log-probs [2b] of the local probe batch, forward only, model state untouched."""
        if self.batch is None:
            return None
        model = unwrap_model(model)
        with preserved_rng(), measurement_mode(model, []), torch.no_grad():
            return sequence_logps(model, self._on(model)).detach().to(torch.float64).cpu()

    def _on(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in self.batch.items()}

    # -- measurements ----------------------------------------------------------------------------------------
    def measure(self, step: int, optimizer: torch.optim.Optimizer | None = None,
                lr: float | None = None) -> dict[str, float]:
        """Measure the probe at the current parameters θ_step; write ``pairs``, ``summary``, ``layers`` (and
        ``summary_adam``) for ``step``; return the summary as scalars named ``entangle/<column>``.

        ``lr`` scales the predicted changes (default: the optimizer's first learning rate, else 1). With an
        Adam/AdamW ``optimizer`` that has state, the summary in Adam's geometry is added as ``entangle/adam/...``.
        """
        lr = _lr(optimizer) if lr is None else float(lr)
        return self._collective(step, "measurement", lambda: self._measure_local(step, optimizer, lr),
                                lambda parts: self._write_measurement(step, parts))

    def _measure_local(self, step: int, optimizer: Any, lr: float) -> dict[str, pd.DataFrame] | None:
        if self.batch is None:
            return None
        with preserved_rng():
            P = self._preconditioner(optimizer)      # plain and Adam geometry come from one backward pass
            ref = self._reference()
            gram = sequence_gram(self.model, self._on(unwrap_model(self.model)), params=self.params,
                                 method=self.method, preconditioner=P, plain=True, **self._structure(ref))
            return self._measurement(gram, step, lr, ref)

    def _structure(self, ref: torch.Tensor | None) -> dict[str, Any]:
        """``sequence_gram`` arguments for ``self.structure``: with ``"pairs"``, the batch-view weights c."""
        if self.structure == "full":
            return {}
        lengths = response_lengths(self.batch)

        def weights(logps: torch.Tensor) -> torch.Tensor:
            return batch_weights(self.objective, logps, lengths, ref, **self.hyper)

        return {"structure": "pairs", "weights": weights}

    def _measurement(self, gram: GramResult, step: int, lr: float, ref: torch.Tensor | None
                     ) -> dict[str, pd.DataFrame]:
        """The local tables of one measurement from its Gram result (plain, with the Adam geometry attached)."""
        frame = self._frame(gram, ref, step, lr)
        self._pre = (step, np.concatenate([frame["batch_dlogp_chosen"], frame["batch_dlogp_rejected"]]))
        out = {"pairs": frame, "layers": layer_frame(gram, step, self.pairs)}
        if gram.preconditioned is not None:
            out["adam"] = self._frame(gram.preconditioned, ref, step, lr)
        return out

    def _frame(self, gram: GramResult, ref: torch.Tensor | None, step: int, lr: float) -> pd.DataFrame:
        extra = {self.pref_col: self._pref} if self.pref_col is not None else {}
        frame = pair_frame(gram, self.objective, ref, step=step, lr=lr, **self.hyper, **extra)
        frame["pair"] = self.pairs
        return frame

    def _summarize(self, pairs: pd.DataFrame) -> pd.DataFrame:
        """``summarize``, with the idealized ranking accuracy when there are preferences and reference log-probs."""
        if self.pref_col is None or self.pref_col not in pairs or "ref_logp_chosen" not in pairs:
            return summarize(pairs)
        return summarize(pairs, pref_col=self.pref_col, beta={**self.objective.defaults, **self.hyper}["beta"])

    def _preconditioner(self, optimizer: Any) -> dict[str, torch.Tensor] | None:
        if optimizer is None or not self.adam:
            return None
        try:
            return adam_preconditioner(optimizer, self.model, self.params)
        except (TypeError, ValueError) as e:  # not Adam, or no state before the first step: no Adam view
            logger.debug("entangle: no Adam geometry: %s", e)
            return None

    def _write_measurement(self, step: int, parts: list[dict | None]) -> dict[str, float]:
        parts = [p for p in parts if p is not None]
        pairs = _concat([p["pairs"] for p in parts], "pair")
        summary = self._summarize(pairs)
        self._last = (step, pairs)
        scalars = _scalars(summary, PREFIX)
        tables = {"pairs": pairs, "summary": summary, "layers": _concat([p["layers"] for p in parts], "pair")}
        if all("adam" in p for p in parts):
            tables["summary_adam"] = self._summarize(_concat([p["adam"] for p in parts], "pair"))
            scalars |= _scalars(tables["summary_adam"], PREFIX + "adam/")
        if self.writer is not None:
            for name, table in tables.items():
                self.writer.write(name, table, step)
        return scalars

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
        and ``method``. Under ``torch.distributed`` only rank 0 computes it (the others return an empty frame).
        Model and training state are left as found; a failure is logged and gives an empty frame (raised with
        ``strict``).
        """
        if self.rank != 0:
            return pd.DataFrame()
        try:
            return self._token_maps(step, pairs, which, method)
        except Exception:
            if self.strict:
                raise
            logger.exception("entangle: token maps at step %s failed", step)
            return pd.DataFrame()

    def _token_maps(self, step: int | None, pairs: Sequence[int] | None, which: str, method: str) -> pd.DataFrame:
        from entangle.capture.tokens import token_map

        if pairs is None:
            picked = self._extreme_pairs(which)
        else:
            bad = [p for p in pairs if not 0 <= int(p) < self.n_pairs]
            if bad:
                raise ValueError(f"pairs {bad} are not probe pair ids (0..{self.n_pairs - 1})")
            picked = [(int(p), "selected") for p in dict.fromkeys(pairs)]
        if step is None:
            if self._last is None:
                raise ValueError("token_maps(step=None) needs a measurement first (or pass step=)")
            step = self._last[0]
        batch = encode_pairs(self.tokenizer, [self._rows[p] for p, _ in picked], **self._encoding)
        model = unwrap_model(self.model)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        frames = []
        with preserved_rng():
            for j, (p, label) in enumerate(picked):
                frame = token_map(model, batch, pair=j, params=self.params if method == "full" else None,
                                  method=method, tokenizer=self.tokenizer)
                frame["pair"] = p
                frames.append(frame.assign(step=step, which=label, method=method))
        out = pd.concat(frames, ignore_index=True)
        out = out[["step", "pair", "which", "method"] + [c for c in out.columns
                                                          if c not in ("step", "pair", "which", "method")]]
        if self.writer is not None:
            self.writer.write("tokens", out, step)
        return out

    def _extreme_pairs(self, which: str) -> list[tuple[int, str]]:
        """[(pair id, label)]: the highest- and/or lowest-cosine pair of the last measurement."""
        if which not in ("extremes", "most", "least"):
            raise ValueError(f"which must be 'extremes', 'most' or 'least', not {which!r}")
        if self._last is None:
            raise ValueError("token_maps needs a measurement first to pick pairs by cosine (or pass pairs=)")
        frame = self._last[1]
        cos = frame.set_index("pair")["cosine"].astype(float)
        cos = cos[np.isfinite(cos.to_numpy())]
        if cos.empty:
            raise ValueError(f"no probe pair has a finite gradient cosine at step {self._last[0]}")
        picked = []
        if which in ("extremes", "most"):
            picked.append((int(cos.idxmax()), "most entangled"))
        if which in ("extremes", "least") and not (picked and int(cos.idxmin()) == picked[0][0]):
            picked.append((int(cos.idxmin()), "least entangled"))
        return picked

    # -- the realised update ---------------------------------------------------------------------------------
    def before_update(self, step: int, optimizer: torch.optim.Optimizer | None = None, measure: bool = False,
                      lr: float | None = None) -> None:
        """Snapshot the measured parameters θ_step; call right before ``optimizer.step()``.

        ``measure=True`` defers :meth:`measure` of ``step`` to :meth:`after_update`, which then takes the Gram
        matrices from the same forward and backward pass at θ_step as the update prediction (one pass instead of
        two). What the measurement needs from before the step is read now: Adam's preconditioner (of the
        ``optimizer``'s state before the step, as :meth:`measure` would use it) and the learning rate ``lr``.
        """
        try:
            named = select_params(unwrap_model(self.model), self.params)
            self._before = {n: p.detach().clone() for n, p in named}
            self._before_step = step
            self._deferred = None
            if measure:
                self._deferred = (self._preconditioner(optimizer), _lr(optimizer) if lr is None else float(lr))
        except Exception:
            self._before = None
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
        if self._deferred is None or self._before_step != step:
            return self._collective(step, "update measurement", lambda: self._update_local(step)[1],
                                    lambda parts: self._write_updates(step, parts))
        return self._collective(step, "measurement", lambda: self._update_local(step),
                                lambda parts: self._write_measurement(step, [p[0] for p in parts])
                                | self._write_updates(step, [p[1] for p in parts]))

    def _update_local(self, step: int) -> tuple[dict[str, pd.DataFrame] | None, pd.DataFrame | None]:
        """(measurement tables or ``None``, ``updates`` table) of this rank for the update of ``step``."""
        before, self._before = self._before, None
        deferred, self._deferred = self._deferred, None
        if before is None or self._before_step != step:
            raise RuntimeError(f"after_update({step}) without before_update({step})")
        if self.batch is None:
            return None, None
        model = unwrap_model(self.model)
        named = select_params(model, self.params)
        measured = None
        with preserved_rng():
            delta = {n: p.detach().to(_wide(p)) - before[n].to(_wide(p)) for n, p in named}
            after = self._logps(model)
            with parameters_at(named, before):
                if deferred is None:
                    pred, logp_before = update_dot(model, self._on(model), delta, params=self.params,
                                                   method=self.method)
                else:                            # the measurement of θ_step and the prediction from one pass
                    ref = self._reference()
                    gram, pred = sequence_gram(model, self._on(model), params=self.params, method=self.method,
                                               preconditioner=deferred[0], plain=True, delta=delta,
                                               **self._structure(ref))
                    logp_before = gram.logps
            if deferred is not None:
                measured = self._measurement(gram, step, deferred[1], ref)
        pred_gradient = self._pre[1] if self._pre is not None and self._pre[0] == step else np.full(len(after), np.nan)
        b = len(self.pairs)
        pair = np.array(self.pairs * 2)
        logp_before = logp_before.detach().to(torch.float64).cpu().numpy()
        after = after.numpy()
        return measured, pd.DataFrame({
            "step": step, "seq": np.concatenate([pair[:b], pair[b:] + self.n_pairs]), "pair": pair,
            "side": ["chosen"] * b + ["rejected"] * b, "logp_before": logp_before, "logp_after": after,
            "observed": after - logp_before, "pred_update": pred.detach().to(torch.float64).cpu().numpy(),
            "pred_gradient": pred_gradient,
        })

    def _write_updates(self, step: int, parts: list[pd.DataFrame | None]) -> dict[str, float]:
        updates = _concat([p for p in parts if p is not None], "seq")
        if self.writer is not None:
            self.writer.write("updates", updates, step)
        obs, pred = updates["observed"].to_numpy(), updates["pred_update"].to_numpy()
        moved = np.abs(obs) > 1e-6 * np.maximum(1.0, np.abs(updates["logp_before"].to_numpy()))
        agree = float((np.sign(obs[moved]) == np.sign(pred[moved])).mean()) if moved.any() else math.nan
        return {PREFIX + "update/sign_agreement": agree, PREFIX + "update/observed_mean": float(obs.mean()),
                PREFIX + "update/pred_mean": float(pred.mean())}

    # -- running one measurement on every rank ---------------------------------------------------------------
    def _collective(self, step: int, what: str, local: Callable[[], Any],
                    combine: Callable[[list[Any]], dict[str, float]]) -> dict[str, float]:
        """Run ``local`` on every rank, ``combine`` the gathered results on rank 0, share its scalars.

        A failure is logged with the step and gives ``{}`` (every rank still joins the collectives, so none
        hangs), or is raised on every rank with ``strict=True``.
        """
        error = None
        try:
            payload = local()
        except Exception as e:
            if self.strict and self.world == 1:
                raise
            logger.exception("entangle: %s at step %d failed on rank %d", what, step, self.rank)
            payload, error = None, f"rank {self.rank}: {type(e).__name__}: {e}"
        parts = gather_to_main((payload, error)) if self.world > 1 else [(payload, error)]
        result = None
        if parts is not None:
            errors = [e for _, e in parts if e is not None]
            if not errors:
                try:
                    result = combine([p for p, _ in parts])
                except Exception as e:
                    if self.strict and self.world == 1:
                        raise
                    logger.exception("entangle: writing the %s of step %d failed", what, step)
                    errors = [f"rank 0: {type(e).__name__}: {e}"]
            result = (result, "; ".join(errors) or None)
        scalars, error = broadcast_from_main(result) if self.world > 1 else result
        if error is not None and self.strict:
            raise RuntimeError(f"entangle: {what} at step {step} failed: {error}")
        return scalars or {}

    def _manifest(self, rows: list[dict], tokenizer: Any, max_length: int | None, truncation: str) -> dict:
        model = unwrap_model(self.model)
        named = select_params(model, self.params)
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
        return {
            "model": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
            "model_class": type(model).__name__,
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "objective": self.objective.name,
            "hyper": {**self.objective.defaults, **self.hyper},
            "params": {"spec": repr(self.params), "tensors": len(named), "numel": sum(p.numel() for _, p in named)},
            "probe": {"pairs": self.n_pairs, "sha256": digest, "max_length": max_length, "truncation": truncation},
            "method": self.method, "world_size": self.world,
            "versions": {"entangle": entangle.__version__, **{k: _version(k) for k in
                                                               ("torch", "transformers", "trl", "peft", "accelerate")}},
        }


# ---------------------------------------------------------------------------------------------------------------


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(unwrap_model(model), "disable_adapter") and hasattr(unwrap_model(model), "peft_config")


@contextlib.contextmanager
def _peft_reference(model: torch.nn.Module) -> Iterator[None]:
    """The reference of a PEFT policy, as TRL uses it: its ``"ref"`` adapter if any, else adapters disabled."""
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


def _wide(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _lr(optimizer: Any) -> float:
    groups = getattr(optimizer, "param_groups", None)
    return float(groups[0]["lr"]) if groups else 1.0


def _concat(frames: list[pd.DataFrame], key: str) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True).sort_values(key, kind="stable").reset_index(drop=True)


def _scalars(summary: pd.DataFrame, prefix: str) -> dict[str, float]:
    row = summary.iloc[0]
    return {prefix + k: float(v) for k, v in row.items() if k != "step" and np.isscalar(v) and np.isreal(v)}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
