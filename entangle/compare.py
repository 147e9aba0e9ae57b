"""``entangle demo --compare``: the same model trained on the same task with each mitigation, side by side.

After one supervised warm-up (as in ``entangle demo``), a copy of the warmed model is trained from the same start,
on the same pairs in the same order, with each method of :data:`METHODS`, each with the
:class:`~entangle.EntanglementCallback` on the same probe:

- ``dpo``: plain DPO (TRL's ``loss_type="sigmoid"``), the baseline;
- ``dpo_nll``: DPO + NLL on the chosen response (RPO; TRL 1.16 ``loss_type=["sigmoid", "sft"]``,
  ``loss_weights=[1, α]``);
- ``dpop``: DPO-Positive (Smaug), ``-log σ(β[m - λ max(0, s_w^ref - s_w)])``, trained by
  :class:`~entangle.mitigate.token_mask.TokenMaskedDPOTrainer` without a mask (TRL 1.16 has no such loss type);
- ``pairwise``: the pairwise normalised gradient (:class:`~entangle.mitigate.trainer.PairwiseNormalizedDPOTrainer`);
- ``token_mask``: DPO on token-masked log-probs (:class:`~entangle.mitigate.token_mask.TokenMaskedDPOTrainer`;
  its callback measures the masked log-probs, whose gradients are the ones its step uses).

Tables (one run directory ``<out>/compare``, read with :func:`entangle.runio.read_table`; step 0 holds them all):

- ``dynamics``: (method, step, pair) the probe's *unmasked* summed log-probs at each measured step, their margin
  and the reference-adjusted margin (the reference is the warmed model, the same for every method);
- ``band``: (method, step, pair) the per-pair step of that method (THEORY §3, issue 11): coefficients ``a_w, a_l``
  of the direction it trains along, r = a_w/|a_l|, r* = ‖g_l‖/‖g_w‖, ρ = cos(g_w, g_l), the band
  [ρ·r*, r*/ρ] (for ρ > 0) and the regime; a pair is in its band exactly when its regime is ``ideal``. For
  ``pairwise`` the direction is ``m (g_w/‖g_w‖ - g_l/‖g_l‖)``: r = r*, the centre of the band;
- ``steps``: (method, step) wall-clock seconds of each training step, and whether the probe was measured in it;
- ``methods``: one row per method: median seconds per unmeasured step and its ratio to DPO's, regime shares and
  in-band share over the measured steps, and at the last step the ranking accuracy, the medians of the margin,
  the reward margin and of the chosen and rejected log-prob changes since step 0, the share of pairs whose chosen
  log-prob fell. :func:`entangle.report.compare.make_compare_report` draws them.

Each run directory ``<out>/run/<method>`` is also a complete run (``entangle report`` reads it).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ._warnings import filter_known_warnings
from .data import encode_pairs, load_pairs
from .demo import (
    DemoConfig,
    _demo_progress,
    _pairs,
    load_model_and_tokenizer,
    on_one_thread_if_builtin,
    supervised_warmup,
)
from .metrics.summary import pair_changes, regime_of
from .runio import RunWriter, read_table
from .schema import REGIMES

TABLES = ("dynamics", "band", "steps", "methods")


@dataclass(frozen=True)
class Method:
    """One compared method: its label, what it is meant to fix, and what it may cost (stated in the report)."""

    name: str
    label: str
    aims: str
    costs: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dpo", "DPO", "the baseline", "chosen log-probs can fall with the rejected ones (entanglement)"),
    Method("dpo_nll", "DPO + NLL", "keeps the chosen log-prob up with a likelihood term (RPO / rpo_alpha)",
           "pulls every chosen token, not only the differing ones; the margin can grow more slowly"),
    Method("dpop", "DPO-Positive", "penalises the chosen log-prob falling below the reference's (Smaug)",
           "acts only once the chosen log-prob has fallen below its reference value; λ to tune"),
    Method("pairwise", "pairwise normalised", "every pair at the centre of its band: chosen cannot fall, "
           "rejected cannot rise, per pair to first order (THEORY §9)",
           "per-pair gradient norms every step (one extra backward of the norms); steps of a different size"),
    Method("token_mask", "token-masked DPO", "down-weights the tokens both responses share, where the "
           "entanglement comes from (THEORY §7, §9)",
           "the shared tokens' log-probs are no longer trained by the margin; an alignment per pair per step"),
)}


@dataclass
class CompareConfig(DemoConfig):
    """Sizes of the comparison; the defaults run all five methods in about a minute on 2 CPU cores."""

    out: str = "entangle-compare"
    methods: tuple[str, ...] = tuple(METHODS)
    n_probe: int = 16
    dpo_steps: int = 40
    nll_alpha: float = 1.0          # DPO + NLL: loss_weights=[1, nll_alpha]
    dpop_lambda: float = 50.0       # DPO-Positive's λ (Smaug's value)
    shared: float = 0.1             # token-masked DPO: weight of the tokens both responses share
    extra: dict[str, Any] = field(default_factory=dict)   # more DPOConfig arguments


class _Recorder:
    """A ``TrainerCallback`` recording the wall-clock time of each step and the probe's unmasked log-probs at each
    measured step (θ_t, before its update) and at the end. Built on first use, so that importing this module does
    not import transformers' trainer."""

    def __new__(cls, batch: dict[str, torch.Tensor], every: int):
        from transformers import TrainerCallback

        from .integrations.reference import probe_logps

        class Recorder(TrainerCallback):
            def __init__(self):
                self.logps: dict[int, np.ndarray] = {}
                self.times: list[tuple[int, float, bool]] = []
                self._t0 = 0.0

            def _record(self, step: int, model) -> None:
                self.logps[step] = probe_logps(model, batch).numpy()

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if state.global_step % every == 0:
                    self._record(state.global_step, model)
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                step = state.global_step - 1
                last = state.global_step >= state.max_steps     # the callback's final measurement ran in it
                self.times.append((step, time.perf_counter() - self._t0, step % every == 0 or last))

            def on_train_end(self, args, state, control, model=None, **kwargs):
                self._record(state.global_step, model)

        return Recorder()


def _trainer(name: str, cfg: CompareConfig, model, ref, tok, dataset, callbacks) -> Any:
    """The trainer of method ``name`` (its ``DPOConfig`` is the demo's, plus the method's loss)."""
    from trl import DPOConfig, DPOTrainer

    from .mitigate.token_mask import TokenMaskedDPOTrainer

    loss = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, cfg.nll_alpha]} if name == "dpo_nll" else {}
    args = DPOConfig(
        output_dir=str(Path(cfg.out) / "trainer" / name), beta=cfg.beta, learning_rate=cfg.dpo_lr,
        max_steps=cfg.dpo_steps, per_device_train_batch_size=cfg.batch_size, logging_steps=cfg.every,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, activation_checkpointing=False,
        lr_scheduler_type="constant", max_length=cfg.max_length, seed=cfg.seed, disable_tqdm=False,
        **loss, **cfg.extra)
    common = {"model": model, "ref_model": ref, "args": args, "processing_class": tok, "train_dataset": dataset,
              "callbacks": callbacks}
    if name in ("dpo", "dpo_nll"):
        return DPOTrainer(**common)
    if name == "dpop":
        return TokenMaskedDPOTrainer(**common, shared=None, objective="dpop", hyper={"dpop_lambda": cfg.dpop_lambda})
    if name == "token_mask":
        return TokenMaskedDPOTrainer(**common, shared=cfg.shared)
    if name == "pairwise":
        from .mitigate.trainer import PairwiseNormalizedDPOTrainer

        return PairwiseNormalizedDPOTrainer(**common)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def run_compare(cfg: CompareConfig | None = None) -> Path:
    """Run the comparison; returns the path of ``compare.html``."""
    filter_known_warnings()
    cfg = cfg or CompareConfig()
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods:
        raise ValueError(f"unknown or no methods {unknown}; choose from {', '.join(METHODS)}")
    return on_one_thread_if_builtin(_run, cfg)


def _run(cfg: CompareConfig) -> Path:
    from datasets import Dataset
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK

    from .integrations.callback import EntanglementCallback
    from .integrations.reference import probe_logps
    from .report.compare import make_compare_report

    out = Path(cfg.out)
    table_dir = out / "compare"
    if table_dir.exists() and any(table_dir.iterdir()):
        raise ValueError(f"{table_dir} already holds a comparison; choose another --out or remove it")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, tok = load_model_and_tokenizer(cfg.model, cfg.seed)
    if cfg.data is not None and cfg.max_length is not None:
        cfg = replace(cfg, data=fitting_pairs(load_pairs(cfg.data), tok, cfg.max_length))
    warm, train, probe = _pairs(cfg)
    print(f"[entangle compare] model: {cfg.model or 'built-in GPT-2'} ({sum(p.numel() for p in model.parameters()):,}"
          f" parameters); {len(train)} training pairs, {len(probe)} probe pairs; methods: {', '.join(cfg.methods)}")
    losses = supervised_warmup(model, tok, warm, cfg.sft_steps, cfg.sft_lr, max_length=cfg.max_length, seed=cfg.seed)
    if losses:
        print(f"[entangle compare] warm-up on chosen responses: loss {losses[0]:.2f} -> {losses[-1]:.2f} nats/token")
    batch = encode_pairs(tok, probe, max_length=cfg.max_length)
    ref_logps = probe_logps(model, batch).numpy()
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train])
    dynamics, band, steps = [], [], []
    for name in cfg.methods:
        t_method = time.perf_counter()
        recorder = _Recorder(batch, cfg.every)
        callback = EntanglementCallback(probe=probe, every=cfg.every, out_dir=str(out / "run" / name),
                                        **_callback_objective(name, cfg))
        torch.manual_seed(cfg.seed)
        trainer = _trainer(name, cfg, copy.deepcopy(model), copy.deepcopy(model), tok, dataset, [callback, recorder])
        trainer.remove_callback(DEFAULT_PROGRESS_CALLBACK)     # in a notebook: a table of ~100 scalars per log
        trainer.add_callback(_demo_progress())
        trainer.train()
        dynamics.append(dynamics_frame(name, recorder.logps, ref_logps))
        band.append(band_frame(name, read_table(out / "run" / name, "pairs")))
        steps.append(pd.DataFrame(recorder.times, columns=["step", "seconds", "measured"]).assign(method=name))
        print(f"[entangle compare] {METHODS[name].label}: {time.perf_counter() - t_method:.0f} s")
    tables = {"dynamics": pd.concat(dynamics, ignore_index=True), "band": pd.concat(band, ignore_index=True),
              "steps": pd.concat(steps, ignore_index=True)[["method", "step", "seconds", "measured"]]}
    tables["methods"] = methods_frame(tables["dynamics"], tables["band"], tables["steps"])
    writer = RunWriter(table_dir)
    for name, frame in tables.items():
        writer.write(name, frame, step=0)
    report = make_compare_report(table_dir, out / "report")
    print(comparison_text(tables["methods"]))
    print(f"[entangle compare] done in {time.perf_counter() - t0:.0f} s; report: {report}")
    return report


def fitting_pairs(rows: list[dict], tokenizer: Any, max_length: int, room: int = 16) -> list[dict]:
    """The rows whose prompt leaves at least ``room`` response tokens within ``max_length`` (TRL drops training
    rows whose prompt reaches ``max_length``; here the probe and warm-up rows are chosen among the same)."""
    keep = [r for r in rows if len(tokenizer(r["prompt"])["input_ids"]) <= max_length - room]
    print(f"[entangle compare] {len(keep)} of {len(rows)} pairs have a prompt of at most {max_length - room} tokens "
          f"(max_length {max_length}); using those")
    return keep


def _callback_objective(name: str, cfg: CompareConfig) -> dict[str, Any]:
    """What the callback measures when it cannot read it from the trainer's config: DPO-Positive's objective."""
    return {"objective": "dpop", "dpop_lambda": cfg.dpop_lambda} if name == "dpop" else {}


def dynamics_frame(method: str, logps: dict[int, np.ndarray], ref_logps: np.ndarray) -> pd.DataFrame:
    """(method, step, pair) rows of probe log-probs [2B] per step (chosen, then rejected) and the reference's."""
    b = len(ref_logps) // 2
    frames = [pd.DataFrame({
        "method": method, "step": step, "pair": np.arange(b), "logp_chosen": s[:b], "logp_rejected": s[b:],
        "ref_logp_chosen": ref_logps[:b], "ref_logp_rejected": ref_logps[b:],
    }) for step, s in sorted(logps.items())]
    f = pd.concat(frames, ignore_index=True)
    f["margin"] = f.logp_chosen - f.logp_rejected
    f["reward_margin"] = (f.logp_chosen - f.ref_logp_chosen) - (f.logp_rejected - f.ref_logp_rejected)
    return f


def band_frame(method: str, pairs: pd.DataFrame) -> pd.DataFrame:
    """(method, step, pair) rows of the step's per-pair band (module docstring) from a run's ``pairs`` table."""
    norm_w, norm_l = np.sqrt(pairs.norm2_chosen), np.sqrt(pairs.norm2_rejected)
    a_w, a_l = pairs.a_chosen.astype(float), pairs.a_rejected.astype(float)
    if method == "pairwise":            # the direction m (g_w/|g_w| - g_l/|g_l|), m = (|a_w| + |a_l|) / 2
        m = (a_w.abs() + a_l.abs()) / 2
        a_w, a_l = m / norm_w, -m / norm_l
    rho = pairs.cosine.astype(float)
    r_star = norm_l / norm_w
    pred_w, pred_l = pair_changes(a_w, a_l, pairs.norm2_chosen, pairs.norm2_rejected, pairs.inner)
    regime = regime_of(pred_w > 0, pred_l < 0)
    positive = rho > 0
    return pd.DataFrame({
        "method": method, "step": pairs.step, "pair": pairs.pair, "a_chosen": a_w, "a_rejected": a_l,
        "r": a_w / -a_l, "r_star": r_star, "rho": rho,
        "band_low": np.where(positive, rho * r_star, 0.0), "band_high": np.where(positive, r_star / rho, np.inf),
        "regime": regime, "in_band": regime == "ideal",
    })


def methods_frame(dynamics: pd.DataFrame, band: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """One row per method (module docstring), in the order the methods ran."""
    rows = []
    order = list(dict.fromkeys(dynamics.method))
    base = None
    for name in order:
        d, b, s = (f[f.method == name] for f in (dynamics, band, steps))
        first, last = d[d.step == d.step.min()].set_index("pair"), d[d.step == d.step.max()].set_index("pair")
        unmeasured = s.seconds[~s.measured.astype(bool)]
        per_step = float((unmeasured if len(unmeasured) else s.seconds).median())
        base = per_step if name == "dpo" or base is None else base
        d_chosen, d_rejected = last.logp_chosen - first.logp_chosen, last.logp_rejected - first.logp_rejected
        row = {
            "method": name, "label": METHODS[name].label, "aims": METHODS[name].aims, "costs": METHODS[name].costs,
            "steps": int(d.step.max()),
            "seconds_per_step": per_step, "time_ratio": per_step / base,
            "ranking_accuracy": float((last.margin > 0).mean()),
            "reward_accuracy": float((last.reward_margin > 0).mean() + 0.5 * (last.reward_margin == 0).mean()),
            "median_margin": float(last.margin.median()), "median_reward_margin": float(last.reward_margin.median()),
            "median_d_chosen": float(d_chosen.median()), "median_d_rejected": float(d_rejected.median()),
            "chosen_fell": float((d_chosen < 0).mean()),
        }
        row |= {f"share_{r}": float((b.regime == r).mean()) for r in REGIMES}
        row["share_in_band"] = float(b.in_band.mean())
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_text(methods: pd.DataFrame) -> str:
    """The ``methods`` table for the terminal: one line per method."""
    cols = {"label": "method", "time_ratio": "time/step (x DPO)", "median_d_chosen": "Δ chosen",
            "median_d_rejected": "Δ rejected", "chosen_fell": "chosen fell", "median_reward_margin": "reward margin",
            "ranking_accuracy": "rank acc", "share_in_band": "in band"}
    return methods[list(cols)].rename(columns=cols).round(3).to_string(index=False)
