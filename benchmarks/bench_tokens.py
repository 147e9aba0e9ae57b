"""Time and peak memory of one pair's token gradient map: the per-token loop against ``full`` and ``head``.

    python benchmarks/bench_tokens.py                        # CPU, ~64 response tokens per side
    python benchmarks/bench_tokens.py --responses 16 32 64   # how each method scales with the tokens
    python benchmarks/bench_tokens.py --device cuda --dtype bf16 --layers 24 \\
        --model-config benchmarks/configs/qwen2.5-0.5b.json  # a config's model; --layers sets its depth

The model is the GPT-2-shaped bench model of ``bench_gram.py`` (4 layers x 256 wide, vocab 8192); the
batch is one pair with a shared 32-token prompt. Methods:

* ``loop``: the approach of the paper's public heatmap script: one backward per response token with a
  retained graph, every per-token gradient flattened (float32) and kept, then ``G G^T``;
* ``full``: ``token_gram(..., method="full")`` (block-wise, the default: one forward of the pair, each block re-run on chunks of per-token copies);
* ``copies``: the same with prefix copies through the whole model (the fallback);
* ``head``: ``token_gram(..., method="head")`` (closed form over the output layer, no backward).

Each (responses, method) runs in a fresh child process so that its peak resident memory (VmHWM) is
its own. Reported: median wall time over --repeat runs after one warm-up, the peak, the peak above the
model+batch baseline, and ratios to the loop measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import bench_gram

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the slow twin lives with the tests

METHODS = ["loop", "full", "copies", "head"]
PROMPT = 32


def _run_method(method: str, model, batch):
    from entangle.capture.tokens import token_gram

    if method == "loop":
        import torch
        from twins import loop_token_grads

        g = loop_token_grads(model, batch, 0, dtype=torch.float32)
        return (g @ g.T).to(torch.float64)
    if method == "copies":
        from entangle.capture.tokens import full_token_gram

        return full_token_gram(model, batch, (0, 1), strategy="copies")
    return token_gram(model, batch, 0, method=method)[0]


def child(responses: int, method: str, device: str, repeat: int, layers: int = 4, model_config: str | None = None,
          dtype: str = "float32") -> dict:
    import torch

    name = f"pair{responses}"
    bench_gram.SHAPES[name] = (layers, 256, 4, 8192, 1, PROMPT, responses)
    model, batch = bench_gram._setup(name, device, model_config, dtype, layers)
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
    sizes = [p.numel() * 4 / 2**20 for p in model.parameters()]
    return {"responses": responses, "tokens": tokens, "method": method, "seconds": statistics.median(times),
            "peak_mb": peak, "above_base_mb": peak - base, "layers": layers,
            "layer_grad_mb": max(sizes), "model_grad_mb": sum(sizes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--responses", nargs="+", type=int, default=[64], help="response tokens per side (about)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", nargs="+", type=int, default=[4],
                    help="model depths to compare (with --model-config: its num_hidden_layers)")
    bench_gram.add_model_options(ap)
    ap.add_argument("--child", nargs=3, metavar=("RESPONSES", "METHOD", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.device, args.repeat, int(args.child[2]),
                               args.model_config, args.dtype)))
        return
    rows = []
    for layers in args.layers:
        for responses in args.responses:
            for method in args.methods:
                rows.append(bench_gram.run_child(__file__, [str(responses), method, str(layers)], args.device,
                                                 args.repeat, {"responses": responses, "method": method,
                                                               "layers": layers}, bench_gram.model_options(args)))
    print_table(rows)
    print_growth(rows)


def print_growth(rows: list[dict]) -> None:
    """Peak memory growth per response token between the smallest and largest --responses, per method and depth."""
    ok = [r for r in rows if "error" not in r]
    keys = sorted({(r["layers"], r["method"]) for r in ok})
    if len({r["tokens"] for r in ok}) < 2:
        return
    print("\n| layers | method | peak growth per token (MB) | largest layer's per-token gradient (MB) "
          "| whole model's per-token gradient (MB) |")
    print("|---|---|---|---|---|")
    for layers, method in keys:
        rs = sorted((r for r in ok if (r["layers"], r["method"]) == (layers, method)), key=lambda r: r["tokens"])
        if len(rs) < 2:
            continue
        lo, hi = rs[0], rs[-1]
        slope = (hi["above_base_mb"] - lo["above_base_mb"]) / (hi["tokens"] - lo["tokens"])
        print(f"| {layers} | {method} | {slope:.2f} | {hi['layer_grad_mb']:.1f} | {hi['model_grad_mb']:.1f} |")


def print_table(rows: list[dict]) -> None:
    base = {(r["layers"], r["responses"]): r for r in rows if r["method"] == "loop" and "seconds" in r}
    print("| layers | response tokens (pair) | method | time (s) | loop / method | peak RSS (MB) | above model+batch (MB) "
          "| × loop |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['layers']} | {r['responses']} | {r['method']} | n/a: {r['error']} | | | | |")
            continue
        b = base.get((r["layers"], r["responses"]))
        speed = f"{b['seconds'] / r['seconds']:.1f}×" if b else ""
        mem = f"{r['above_base_mb'] / b['above_base_mb']:.2f}" if b and b["above_base_mb"] > 0 else ""
        print(f"| {r['layers']} | {r['tokens']} | {r['method']} | {r['seconds']:.4f} | {speed} | {r['peak_mb']:.0f} | "
              f"{r['above_base_mb']:.0f} | {mem} |")


if __name__ == "__main__":
    main()
