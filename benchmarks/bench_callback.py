"""Wall-time overhead of EntanglementCallback on a short TRL DPO run, against the same run without it.

    python benchmarks/bench_callback.py [--steps 40] [--every 10] [--probe 16] [--batch 2] [--grad-accum 8]
                                        [--repeats 7] [--no-update-check] [--no-adam] [--structure pairs]
                                        [--train-every K [--gradient-checkpointing]]
                                        [--device cuda --dtype bf16 --model-config CONFIG_JSON]

``--train-every K`` measures the training pairs themselves inside the trainer's own passes on every K-th step
(``EntanglementCallback(train_every=K)``, no probe) and also prints the peak memory (VmHWM) of one run of each kind,
each in a fresh child process.

Both runs use the built-in GPT-2 (no downloads), or with ``--model-config`` that config's model with random
weights (its own vocabulary, fed the built-in tokenizer's ids), the same data and seed; the callback measures a
probe of ``--probe`` pairs every ``--every`` optimizer steps (Gram in the plain and Adam geometries, realised
update) and at the end. Each optimizer step takes ``--grad-accum`` micro-batches of ``--batch`` pairs; the default is the
shape of TRL's documented DPO recipe (``trl/scripts/dpo.py``: ``--per_device_train_batch_size 2
--gradient_accumulation_steps 8``, 16 pairs per optimizer step, as many as the probe). Runs alternate (without,
with, without, ...) after one untimed warm-up run of each kind; the overhead is the median over the ``--repeats``
adjacent pairs of runs (robust to the load of a shared machine drifting during the invocation), and the ratio of
the fastest run of each kind is printed beside it.

It also prints a lower bound that no exact measurement can beat: one bare forward and backward pass over the
probe (per-sequence gradients at theta_t need at least that) plus one forward pass (the log-probs at
theta_t+1, for the observed change), timed on their own, in optimizer steps of the run.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
import warnings

import bench_gram


def make_model(tok, n_layer: int = 4, n_embd: int = 128, model_config: str | None = None, dtype: str = "float32",
               device: str = "cpu"):
    """The built-in GPT-2 (``n_layer`` x ``n_embd``) or, with ``model_config``, that config's model, on ``device``."""
    import torch

    from entangle.builtin import builtin_model

    if model_config:
        return bench_gram.config_model(model_config, device, dtype)
    return builtin_model(tok, n_layer=n_layer, n_embd=n_embd).to(device, getattr(torch, bench_gram.DTYPES[dtype]))


def run_once(steps: int, every: int, n_probe: int, with_callback: bool, model_kwargs: dict,
             callback_kwargs: dict | None = None, batch: int = 8, grad_accum: int = 1, train_every: int | None = None,
             checkpointing: bool = False) -> float:
    """Seconds of one DPO run of ``steps`` optimizer steps; ``model_kwargs`` go to :func:`make_model`."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from entangle.builtin import builtin_pairs, builtin_tokenizer
    from entangle.integrations.callback import EntanglementCallback

    tok = builtin_tokenizer()
    model = make_model(tok, **model_kwargs)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
            for r in builtin_pairs(batch * grad_accum * steps, seed=1)]
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=grad_accum, learning_rate=1e-4, report_to=[],
                         save_strategy="no", use_cpu=model_kwargs["device"] == "cpu",
                         bf16=model_kwargs["dtype"] == "bf16", logging_steps=1, seed=0, disable_tqdm=True,
                         gradient_checkpointing=checkpointing)
        if train_every is not None:     # the training pairs, in-pass; no probe
            callbacks = [EntanglementCallback(train_every=train_every)] if with_callback else None
        else:
            callbacks = [EntanglementCallback(builtin_pairs(n_probe, seed=2), every=every,
                                              **(callback_kwargs or {}))] if with_callback else None
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=callbacks)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def bare_passes(n_probe: int, model_kwargs: dict, repeats: int = 7) -> float:
    """Seconds of one forward+backward (to the inputs, no weight gradients) and one forward over the probe."""
    import torch

    from entangle.builtin import builtin_pairs, builtin_tokenizer
    from entangle.capture.logprobs import sequence_logps
    from entangle.data import encode_pairs

    tok = builtin_tokenizer()
    model = make_model(tok, **model_kwargs).eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in encode_pairs(tok, builtin_pairs(n_probe, seed=2)).items()}
    embed = model.get_input_embeddings().weight
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once() -> float:
        sync()
        start = time.perf_counter()
        torch.autograd.grad(sequence_logps(model, batch).sum(), [embed])
        with torch.no_grad():
            sequence_logps(model, batch)
        sync()
        return time.perf_counter() - start

    once()
    return min(once() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--probe", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--n-layer", type=int, help="the built-in GPT-2's depth (default 4)")
    parser.add_argument("--n-embd", type=int, help="the built-in GPT-2's width (default 128)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the Trainer's device)")
    bench_gram.add_model_options(parser)
    parser.add_argument("--no-update-check", action="store_true", help="callback check_updates=False")
    parser.add_argument("--no-adam", action="store_true", help="callback adam=False (no Adam-geometry view)")
    parser.add_argument("--structure", choices=["pairs", "full"], default="pairs",
                        help="callback structure= (full: the whole probe Gram matrix)")
    parser.add_argument("--train-every", type=int, help="measure the training pairs in-pass every K steps, no probe")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="DPOConfig(gradient_checkpointing=True)")
    parser.add_argument("--child-memory", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if opts.model_config and (opts.n_layer or opts.n_embd):
        parser.error("--n-layer/--n-embd size the built-in GPT-2; with --model-config the config sets the model")
    model_kwargs = {"n_layer": opts.n_layer or 4, "n_embd": opts.n_embd or 128, "model_config": opts.model_config,
                    "dtype": opts.dtype, "device": opts.device}
    model_name = (f"{opts.model_config} ({opts.dtype}, {opts.device})" if opts.model_config
                  else f"GPT-2 {model_kwargs['n_layer']}x{model_kwargs['n_embd']}")
    callback_kwargs = {"check_updates": not opts.no_update_check, "adam": not opts.no_adam,
                       "structure": opts.structure}
    run_kwargs = {"batch": opts.batch, "grad_accum": opts.grad_accum, "train_every": opts.train_every,
                  "checkpointing": opts.gradient_checkpointing}
    if opts.child_memory is not None:     # one run in this fresh process: its peak resident memory
        run_once(opts.steps, opts.every, opts.probe, bool(opts.child_memory), model_kwargs, callback_kwargs,
                 **run_kwargs)
        print(f"VmHWM {bench_gram._vmhwm_mb():.1f}")
        return
    for flag in (False, True):   # warm-up: imports, first-call costs
        run_once(2, 1, opts.probe, flag, model_kwargs, train_every=opts.train_every,
                 checkpointing=opts.gradient_checkpointing)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(opts.repeats):
        for flag in (False, True):
            times[flag].append(run_once(opts.steps, opts.every, opts.probe, flag, model_kwargs, callback_kwargs,
                                        **run_kwargs))
    base, with_cb = min(times[False]), min(times[True])
    if opts.train_every is not None:
        _print_in_pass(opts, model_name, times)
        return
    measured = len({*range(0, opts.steps, opts.every), opts.steps})
    print(f"DPO run: {opts.steps} steps of {opts.grad_accum} x {opts.batch} pairs, {model_name}; "
          f"probe {opts.probe} pairs, every {opts.every} steps ({measured} measurements; "
          f"update check {'off' if opts.no_update_check else 'on'}, Adam view {'off' if opts.no_adam else 'on'}, "
          f"structure {opts.structure})")
    print(f"without callback: {base:.2f} s   with callback: {with_cb:.2f} s   "
          f"(runs: {[round(t, 2) for t in times[False]]} / {[round(t, 2) for t in times[True]]})")
    step = base / opts.steps
    ratio = statistics.median(c / b for b, c in zip(times[False], times[True], strict=True))
    per_measurement = (ratio - 1) * opts.steps / measured
    print(f"overhead: {ratio - 1:+.1%}  (median over the {opts.repeats} adjacent pairs of runs; fastest runs "
          f"{with_cb / base - 1:+.1%}; one measurement ~ {per_measurement:.1f} optimizer steps of this run)")
    floor = bare_passes(opts.probe, model_kwargs) / step
    print(f"lower bound for any exact measurement: a bare forward+backward and a forward over the probe ~ "
          f"{floor:.2f} optimizer steps -> {floor * measured / opts.steps:+.1%} at {measured} measurements "
          f"in {opts.steps} steps")


def _print_in_pass(opts, model_name: str, times: dict[bool, list[float]]) -> None:
    """The in-pass rows: time overhead (paired median) and peak memory of one run of each kind (child processes)."""
    import subprocess
    import sys

    base, with_cb = min(times[False]), min(times[True])
    ratio = statistics.median(c / b for b, c in zip(times[False], times[True], strict=True))
    print(f"DPO run: {opts.steps} steps of {opts.grad_accum} x {opts.batch} pairs, {model_name}, gradient "
          f"checkpointing {'on' if opts.gradient_checkpointing else 'off'}; the training pairs measured in-pass "
          f"every {opts.train_every} steps")
    print(f"without callback: {base:.2f} s   with callback: {with_cb:.2f} s   "
          f"(runs: {[round(t, 2) for t in times[False]]} / {[round(t, 2) for t in times[True]]})")
    print(f"overhead: {ratio - 1:+.1%}  (median over the {opts.repeats} adjacent pairs of runs; fastest runs "
          f"{with_cb / base - 1:+.1%})")
    argv = [a for a in sys.argv[1:] if a != "--child-memory"]
    peaks = {}
    for flag in (0, 1):
        out = subprocess.run([sys.executable, __file__, *argv, "--child-memory", str(flag)], capture_output=True,
                             text=True, check=True).stdout
        peaks[flag] = float(out.strip().splitlines()[-1].split()[1])
    print(f"peak RSS (VmHWM, one run each in a fresh process): without {peaks[0]:.0f} MB, with {peaks[1]:.0f} MB "
          f"({peaks[1] / peaks[0]:.3f}x)")


if __name__ == "__main__":
    main()
