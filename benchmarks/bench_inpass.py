"""Where in-pass capture's time goes: a DPO micro-step with TRL's fused LM head, without and with hooks, side by side.

    python benchmarks/bench_inpass.py [--micro 32] [--accum 8] [--batch 2] [--rounds 12] [--threads N]

The built-in GPT-2 (4 x 128, no downloads, with TRL's fused LM head) trains on built-in pairs, ``--batch`` pairs per
micro-step, one recording per ``--accum`` micro-steps (an optimizer step's), without an optimizer. Each round times
every variant once over ``--micro`` micro-steps, in turn; the table gives each variant's median over the rounds and
its overhead on the median without hooks:

* ``no-op forward hooks``: a forward hook that does nothing on every module with measured parameters (what
  ``GramEngine`` hooks);
* ``no-op forward + output hooks``: the same, and a backward hook that does nothing on each call's output (where the
  engine receives each output gradient);
* ``PassRecorder``: in-pass capture itself (``entangle.capture.inpass``), every reduction included;
* ``PassRecorder, reductions off``: the same with the engine's reductions replaced by nothing (its hooks, the
  coefficient capture, the fused head's output gradient and the set-up alone).

The training loop is the same in every variant; only what is hooked differs. Wall times of one process on a shared
machine drift, which is why the variants alternate within each round.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, default=32, help="micro-steps per timed run")
    parser.add_argument("--accum", type=int, default=8, help="micro-steps per recording (an optimizer step's)")
    parser.add_argument("--batch", type=int, default=2, help="pairs per micro-step")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch
    from trl.trainer.utils import add_fused_lm_head

    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
    from entangle.capture import engine as engine_module
    from entangle.capture.engine import engine_layout
    from entangle.capture.inpass import PassRecorder
    from entangle.capture.params import select_params
    from entangle.data import encode_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = builtin_tokenizer()
    model = builtin_model(tok, n_layer=4, n_embd=128).train()
    add_fused_lm_head(model)
    rows = builtin_pairs(args.micro * args.batch, seed=1)
    batches = [encode_pairs(tok, rows[i:i + args.batch]) for i in range(0, len(rows), args.batch)]
    named = select_params(model)
    owners = [m for m, _ in engine_layout(model, named)[0]]

    def micro_step(batch) -> None:
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                  fused_lm_head=True).log_probs.sum(-1)
        b = s.shape[0] // 2
        (-torch.nn.functional.logsigmoid(0.1 * (s[:b] - s[b:]))).sum().backward()

    def plain() -> None:
        for batch in batches:
            micro_step(batch)

    def with_noop_hooks(output_hooks: bool):
        def forward_hook(module, inputs, kwargs, out):
            if output_hooks and torch.is_tensor(out) and out.requires_grad:
                out.register_hook(lambda grad: None)

        def run() -> None:
            handles = [m.register_forward_hook(forward_hook, with_kwargs=True, prepend=True) for m in owners]
            try:
                plain()
            finally:
                for h in handles:
                    h.remove()
        return run

    recorder = PassRecorder(model, named, strict=True)

    def recorded(reductions: bool):
        def run() -> None:
            saved = engine_module.GramEngine._reduce, engine_module.GramEngine._flush_pending
            if not reductions:
                engine_module.GramEngine._reduce = lambda self, *a: None
                engine_module.GramEngine._flush_pending = lambda self: None
            try:
                for i in range(0, len(batches), args.accum):
                    with recorder.recording() as records:
                        for batch in batches[i:i + args.accum]:
                            micro_step(batch)
                    if reductions and len(records) != len(batches[i:i + args.accum]):
                        raise RuntimeError(f"{len(records)} records for {args.accum} micro-steps: {recorder.errors}")
            finally:
                engine_module.GramEngine._reduce, engine_module.GramEngine._flush_pending = saved
        return run

    variants = {
        "no hooks": plain,
        "no-op forward hooks": with_noop_hooks(False),
        "no-op forward + output hooks": with_noop_hooks(True),
        "PassRecorder, reductions off": recorded(False),
        "PassRecorder": recorded(True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for run in variants.values():                   # warm-up
        run()
        model.zero_grad(set_to_none=True)
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / len(batches) * 1e3)
            model.zero_grad(set_to_none=True)
    recorder.close()
    base = statistics.median(times["no hooks"])
    print(f"DPO micro-steps with TRL's fused head: built-in GPT-2 4x128, {args.batch} pairs each, {len(batches)} per "
          f"run, {args.accum} per recording, {args.rounds} rounds, {len(owners)} hooked modules, "
          f"{torch.get_num_threads()} threads")
    print("| variant | ms per micro-step (median) | overhead |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {100 * (median / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
