"""``entangle demo``: the whole pipeline on a built-in task, end to end, on a CPU, with nothing downloaded.

1. a small GPT-2 and a word-level tokenizer are built from code (``entangle.builtin``), or a user's model;
2. it is fine-tuned on the chosen responses (a short supervised warm-up, as before DPO in practice);
3. TRL's ``DPOTrainer`` trains it on preference pairs with :class:`EntanglementCallback` attached, measuring a
   probe set of pairs every few steps;
4. a ``covariates`` table records how much each probe pair's two responses share (pair kind, shared prefix,
   token overlap), a ``tokens`` table the token-level gradient maps of the most and least entangled probe
   pairs at the final step, and ``entangle report`` turns the run directory into figures and ``report.html``.

The built-in task follows the controlled sentiment experiment of Yuan et al. (arXiv:2410.13828): pairs
that differ only in their last token, in a short suffix, in a long suffix, or that are unrelated.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ._warnings import filter_known_warnings
from .data import encode_pairs, load_pairs, with_pad_token
from .runio import RunWriter, read_table

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults run in well under 3 minutes on 2 CPU cores."""

    out: str = "entangle-demo"
    model: str | None = None            # None: the built-in GPT-2; else a local dir or hub name
    data: str | None = None             # None: the built-in sentiment pairs; else any load_pairs source
    n_train: int = 256                  # DPO training pairs
    n_probe: int = 32                   # measured probe pairs
    sft_steps: int = 150
    sft_lr: float = 3e-3
    dpo_steps: int = 60
    dpo_lr: float = 1e-3
    batch_size: int = 16
    beta: float = 0.1
    every: int = 10
    max_length: int | None = None
    seed: int = 0


def load_model_and_tokenizer(model: str | None, seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the built-in GPT-2 (initialised from ``seed``) and tokenizer when ``model`` is None,
    else ``AutoModelForCausalLM`` and ``AutoTokenizer`` from the local directory or hub name ``model``.

    The model is loaded first, so a name that is no model fails with transformers' model error rather than a
    tokenizer library's. A tokenizer without a pad token gets its EOS token as pad token (logged).
    """
    if model is None:
        from .builtin import builtin_model, builtin_tokenizer

        tok = builtin_tokenizer()
        return builtin_model(tok, seed=seed), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(model)
    return loaded, with_pad_token(AutoTokenizer.from_pretrained(model), repr(model))


def _pairs(cfg: DemoConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(warm-up rows, DPO training rows, probe rows)."""
    if cfg.data is None:
        from .builtin import builtin_pairs

        return (builtin_pairs(512, seed=cfg.seed + 1), builtin_pairs(cfg.n_train, seed=cfg.seed + 3),
                builtin_pairs(cfg.n_probe, seed=cfg.seed + 7))
    rows = load_pairs(cfg.data)
    if len(rows) < cfg.n_probe + 8:
        raise ValueError(f"--data has {len(rows)} usable pairs; the demo needs at least {cfg.n_probe + 8}")
    probe, train = rows[:cfg.n_probe], rows[cfg.n_probe:cfg.n_probe + cfg.n_train]
    return train, train, probe


def supervised_warmup(model, tokenizer, rows: list[dict], steps: int, lr: float, batch_size: int = 32,
                      max_length: int | None = None, seed: int = 0) -> list[float]:
    """Fine-tune on the chosen responses (token-mean NLL of the response given the prompt); returns the losses."""
    from .capture.logprobs import model_logits, token_logps

    if steps <= 0:
        return []
    enc = encode_pairs(tokenizer, rows, max_length=max_length)
    n = len(rows)
    chosen = {k: v[:n] for k, v in enc.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="supervised warm-up", leave=False):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        batch = {k: v[idx] for k, v in chosen.items()}
        loss = -token_logps(model_logits(model, batch), batch).sum() / batch["completion_mask"][:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def write_covariates(out_dir: Path, tokenizer, probe: list[dict], max_length: int | None) -> pd.DataFrame:
    """How much each probe pair's responses share (text only), with its kind when the rows have one."""
    from .metrics.covariates import pair_covariates

    frame = pair_covariates(encode_pairs(tokenizer, probe, max_length=max_length))
    if all("kind" in r for r in probe):
        frame.insert(1, "kind", [r["kind"] for r in probe])
    frame.insert(0, "step", 0)
    RunWriter(out_dir).write("covariates", frame, step=0)
    return frame


def run_demo(cfg: DemoConfig | None = None) -> Path:
    """Run the demo; returns the path of ``report.html``."""
    filter_known_warnings()
    cfg = cfg or DemoConfig()
    return on_one_thread_if_builtin(_run, cfg)


def on_one_thread_if_builtin(run: Callable[[Any], Path], cfg: Any) -> Path:
    """``run(cfg)``, on one thread when ``cfg.model`` is None (the built-in model is tiny: thread synchronisation
    costs more than it saves, 10x on a busy machine)."""
    if cfg.model is not None:
        return run(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig) -> Path:
    from datasets import Dataset
    from transformers.trainer_callback import ProgressCallback
    from trl import DPOConfig, DPOTrainer

    from .integrations.callback import EntanglementCallback
    from .report import make_report

    out = Path(cfg.out)
    run_dir = out / "run"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} already holds a run; choose another --out or remove it")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    warm, train, probe = _pairs(cfg)
    model, tok = load_model_and_tokenizer(cfg.model, cfg.seed)
    print(f"[entangle demo] model: {cfg.model or 'built-in GPT-2'} ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters); {len(train)} training pairs, {len(probe)} probe pairs")
    losses = supervised_warmup(model, tok, warm, cfg.sft_steps, cfg.sft_lr, max_length=cfg.max_length, seed=cfg.seed)
    if losses:
        print(f"[entangle demo] warm-up on chosen responses: loss {losses[0]:.2f} -> {losses[-1]:.2f} nats/token")
    write_covariates(run_dir, tok, probe, cfg.max_length)
    columns = ["prompt", "chosen", "rejected"]
    args = DPOConfig(
        output_dir=str(out / "trainer"), beta=cfg.beta, learning_rate=cfg.dpo_lr, max_steps=cfg.dpo_steps,
        per_device_train_batch_size=cfg.batch_size, logging_steps=cfg.every, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, activation_checkpointing=False, lr_scheduler_type="constant", max_length=cfg.max_length,
        seed=cfg.seed, disable_tqdm=False,
    )
    callback = EntanglementCallback(probe=probe, every=cfg.every, out_dir=str(run_dir))
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{k: r[k] for k in columns} for r in train]),
                         callbacks=[callback])
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_demo_progress())
    trainer.train()
    if callback.monitor is not None:   # token maps of the most and least entangled probe pairs, at the final step
        callback.monitor.token_maps()
    report = make_report(run_dir, out / "report")
    print(summary_text(run_dir))
    print(f"[entangle demo] done in {time.perf_counter() - t0:.0f} s; report: {report}")
    return report


def _demo_progress() -> Any:
    """transformers' progress bar, with the DPO loss and two entanglement scalars as its postfix instead of every
    logged dict (about 100 ``entangle/...`` scalars per measurement) printed in full. Built on first use, so that
    importing this module (as ``entangle --help`` does) does not import transformers' trainer."""
    from transformers.trainer_callback import ProgressCallback

    class DemoProgress(ProgressCallback):
        SHOWN = {"loss": "loss", "entangle/share_both_fall": "both_fall", "entangle/cosine_q50": "cosine_q50"}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {v: f"{float(logs[k]):.3g}" for k, v in self.SHOWN.items() if k in logs}
                if shown:
                    self.training_bar.set_postfix(shown)

    return DemoProgress()


def summary_text(run_dir: str | Path) -> str:
    """A terminal summary: per pair kind, how the log-probs moved over the run and how entangled the pairs are."""
    pairs, cov = read_table(run_dir, "pairs"), read_table(run_dir, "covariates")
    if pairs.empty:
        return "no measurements were written"
    first, last = pairs[pairs.step == pairs.step.min()], pairs[pairs.step == pairs.step.max()]
    moved = last.set_index("pair")[["logp_chosen", "logp_rejected"]] - first.set_index("pair")[
        ["logp_chosen", "logp_rejected"]]
    table = pd.DataFrame({
        "chosen_fell": moved["logp_chosen"] < 0, "rejected_fell": moved["logp_rejected"] < 0,
        "d_chosen": moved["logp_chosen"], "d_rejected": moved["logp_rejected"],
        "cosine": pairs.groupby("pair")["cosine"].median(), "ratio": pairs.groupby("pair")["ratio"].median(),
    })
    group = "kind" if "kind" in cov else None
    if group:
        table = table.join(cov.set_index("pair")[["kind", "jaccard"]])
        agg = table.groupby("kind", sort=False).agg(
            pairs=("cosine", "size"), token_overlap=("jaccard", "median"), chosen_fell=("chosen_fell", "mean"),
            median_d_chosen=("d_chosen", "median"), median_d_rejected=("d_rejected", "median"),
            median_cosine=("cosine", "median"), median_ratio=("ratio", "median"))
    else:
        agg = table.agg({"chosen_fell": "mean", "d_chosen": "median", "d_rejected": "median", "cosine": "median",
                         "ratio": "median"}).to_frame("all pairs").T
    steps = f"steps {int(first.step.iloc[0])}-{int(last.step.iloc[0])}"
    head = (f"Over {steps}, the chosen log-prob fell for {table['chosen_fell'].mean():.0%} of probe pairs and the "
            f"rejected one for {table['rejected_fell'].mean():.0%}. Medians over measured steps, per pair kind "
            "(Δ in nats):")
    return head + "\n" + agg.round(3).to_string()
