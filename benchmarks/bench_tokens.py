"""Time and peak memory of one pair's token gradient map: the per-token loop against ``full`` and ``head``.

    python benchmarks/bench_tokens.py                        # CPU, ~64 response tokens per side
    python benchmarks/bench_tokens.py --responses 16 32 64   # how each method scales with the tokens

The model is the GPT-2-shaped bench model of ``bench_gram.py`` (4 layers x 256 wide, vocab 8192); the
batch is one pair with a shared 32-token prompt. Methods:

* ``loop``: the approach of the paper's public heatmap script: one backward per response token with a
  retained graph, every per-token gradient flattened (float32) and kept, then ``G G^T``;
* ``full``: ``token_gram(..., method="full")`` (prefix copies, one backward, per-layer reduction);
* ``head``: ``token_gram(..., method="head")`` (closed form over the output layer, no backward).

Each (responses, method) runs in a fresh child process so that its peak resident memory (VmHWM) is
its own. Reported: median wall time over --repeat runs after one warm-up, the peak, the peak above the
model+batch baseline, and ratios to the loop measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import bench_gram

METHODS = ["loop", "full", "head"]
PROMPT = 32


def _run_method(method: str, model, batch):
    from entangle.capture.tokens import _loop_token_grads, token_gram

    if method == "loop":
        import torch

        g = _loop_token_grads(model, batch, 0, dtype=torch.float32)
        return (g @ g.T).to(torch.float64)
    return token_gram(model, batch, 0, method=method)[0]


def child(responses: int, method: str, device: str, repeat: int) -> dict:
    import torch

    name = f"pair{responses}"
    bench_gram.SHAPES[name] = (4, 256, 4, 8192, 1, PROMPT, responses)
    model, batch = bench_gram._setup(name, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    base = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else bench_gram._vmhwm_mb()
    _run_method(method, model, batch)                                   # warm-up
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        _run_method(method, model, batch)
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else bench_gram._vmhwm_mb()
    tokens = int(batch["completion_mask"].sum())
    return {"responses": responses, "tokens": tokens, "method": method, "seconds": statistics.median(times),
            "peak_mb": peak, "above_base_mb": peak - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", nargs="+", type=int, default=[64], help="response tokens per side (about)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("RESPONSES", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.device, args.repeat)))
        return
    rows = []
    for responses in args.responses:
        for method in args.methods:
            rows.append(bench_gram.run_child(__file__, [str(responses), method], args.device, args.repeat,
                                             {"responses": responses, "method": method}))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    base = {r["responses"]: r for r in rows if r["method"] == "loop" and "seconds" in r}
    print("| response tokens (pair) | method | time (s) | loop / method | peak RSS (MB) | above model+batch (MB) "
          "| × loop |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['responses']} | {r['method']} | n/a: {r['error']} | | | | |")
            continue
        b = base.get(r["responses"])
        speed = f"{b['seconds'] / r['seconds']:.1f}×" if b else ""
        mem = f"{r['above_base_mb'] / b['above_base_mb']:.2f}" if b and b["above_base_mb"] > 0 else ""
        print(f"| {r['tokens']} | {r['method']} | {r['seconds']:.4f} | {speed} | {r['peak_mb']:.0f} | "
              f"{r['above_base_mb']:.0f} | {mem} |")


if __name__ == "__main__":
    main()
