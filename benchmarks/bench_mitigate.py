"""Time and peak memory of one training step of each mitigation against the plain DPO step, side by side.

    python benchmarks/bench_mitigate.py                       # CPU: the GPT-2-shaped model, shape "long"
    python benchmarks/bench_mitigate.py --shapes long short --device cuda

A step is the forward and backward pass that fills ``.grad`` for one batch (the optimizer's update is the same for
every method and left out), on bench_gram's GPT-2-shaped model and batch, all with the plain-logits forward:

* ``plain_dpo_step``: DPO (``sigmoid``, β = 0.1), ``loss.backward()``;
* ``dpo_nll``: DPO + NLL of the chosen response (TRL's ``loss_type=["sigmoid", "sft"]``, weights [1, 1]);
* ``dpo_positive``: DPO-Positive (``dpop``, λ = 50);
* ``token_masked``: DPO on token-weighted log-probs (``mask_batch``'s alignment weights, computed once outside the
  timed step as a collator would);
* ``pairwise_normalized``: ``entangle.pairwise_normalized_backward`` (the engine's norm pass, then the surrogate's
  backward through the kept graph). Target: at most 1.8x the plain step.

Peak memory: each (shape, method) runs one warm-up and one step in a fresh child process (bench_gram's
``run_child``), so its peak resident memory (VmHWM) is its own; on CUDA the peak is torch.cuda.max_memory_allocated.
Time: one more child per shape builds the model once and runs --repeat rounds, each round one step of every method
back to back, so that a busy machine's drifting load hits all methods alike; reported are each method's median
time and the median over rounds of its ratio to the plain step of the same round.
"""

from __future__ import annotations

import json
import statistics
import time

from bench_gram import _setup, _vmhwm_mb, model_options, parse_args, print_table, run_child

OBJECTIVES = {  # method -> (objective, loss_weights, hyper)
    "plain_dpo_step": ("sigmoid", None, {"beta": 0.1}),
    "dpo_nll": (["sigmoid", "sft"], [1.0, 1.0], {"beta": 0.1}),
    "dpo_positive": ("dpop", None, {"beta": 0.1, "dpop_lambda": 50.0}),
    "token_masked": ("sigmoid", None, {"beta": 0.1}),
}
METHODS = [*OBJECTIVES, "pairwise_normalized"]


def make_step(method: str, model, batch):
    """The method's step: a function that zeroes ``.grad`` and fills it for ``batch``."""
    import torch

    from entangle.capture.logprobs import response_lengths, sequence_logps
    from entangle.metrics.objectives import resolve_objective
    from entangle.mitigate import pairwise_normalized_backward

    with torch.no_grad():
        ref = sequence_logps(model, batch).double() - 0.1             # a reference model's log-probs
    if method == "pairwise_normalized":
        def step():
            model.zero_grad(set_to_none=True)
            pairwise_normalized_backward(model, batch, "sigmoid", ref, beta=0.1)
        return step
    objective, weights, hyper = OBJECTIVES[method]
    obj = resolve_objective(objective, weights)
    data = batch
    if method == "token_masked":
        from entangle.mitigate.token_mask import mask_batch  # imports TRL: only where it is used

        data = mask_batch(batch)
    n = response_lengths(batch).to(ref.device)
    b = n.shape[0] // 2

    def step():
        model.zero_grad(set_to_none=True)
        s = sequence_logps(model, data)
        r = ref.to(s.dtype)
        loss = obj(s[:b], s[b:], ref_chosen_logps=r[:b], ref_rejected_logps=r[b:], chosen_lengths=n[:b],
                   rejected_lengths=n[b:], **hyper)
        loss.mean().backward()
    return step


def child(shape: str, method: str, device: str, repeat: int, model_config: str | None = None,
          dtype: str = "float32") -> dict:
    """Peak memory of ``method`` (warm-up and one step), or with ``method="interleaved:m1,m2,..."`` the times of
    those methods (plain_dpo_step first) over ``repeat`` rounds of back-to-back steps: per method, the median
    seconds and the median ratio to the same round's plain step."""
    import torch

    model, batch = _setup(shape, device, model_config, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if method.startswith("interleaved:"):
        steps = {m: make_step(m, model, batch) for m in method.split(":")[1].split(",")}
        for step in steps.values():                                   # warm-up
            step()
        times: dict[str, list[float]] = {m: [] for m in steps}
        for _ in range(repeat):
            for m, step in steps.items():
                sync()
                t = time.perf_counter()
                step()
                sync()
                times[m].append(time.perf_counter() - t)
        return {m: {"seconds": statistics.median(ts),
                    "ratio": statistics.median(t / p for t, p in zip(ts, times["plain_dpo_step"], strict=True))}
                for m, ts in times.items()}
    base = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else _vmhwm_mb()
    step = make_step(method, model, batch)
    step()
    step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _vmhwm_mb()
    return {"shape": shape, "method": method, "peak_mb": peak, "above_base_mb": peak - base}


def print_rows(rows: list[dict]) -> None:
    """The markdown table: time and its ratio from the interleaved rounds, peaks and their ratios per process."""
    print_table(rows)


def main() -> None:
    args = parse_args(__doc__, ["long"], METHODS)
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.repeat, args.model_config, args.dtype)))
        return
    methods = ["plain_dpo_step", *(m for m in args.methods if m != "plain_dpo_step")]   # the ratios' baseline
    rows = []
    for shape in args.shapes:
        timed = run_child(__file__, [shape, "interleaved:" + ",".join(methods)], args.device, args.repeat, {},
                          model_options(args))
        for method in methods:
            row = run_child(__file__, [shape, method], args.device, 1, {"shape": shape, "method": method},
                            model_options(args))
            rows.append({**row, **timed.get(method, {"error": timed.get("error", "not timed")})})
    print_rows(rows)

if __name__ == "__main__":
    main()
