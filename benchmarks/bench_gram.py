"""Time and peak memory of the Gram-matrix methods against one plain DPO training step, side by side.

    python benchmarks/bench_gram.py                 # CPU: the GPT-2-shaped model at two batch shapes
    python benchmarks/bench_gram.py --shapes gpt2-small --device cuda
    python benchmarks/bench_gram.py --device cuda --dtype bf16 --model-config benchmarks/configs/qwen2.5-0.5b.json

Each (shape, method) runs in a fresh child process, so its peak resident memory (VmHWM from
/proc/self/status, THEORY §6) is its own; on CUDA the peak is torch.cuda.max_memory_allocated.
Reported: median wall time over --repeat runs after one warm-up, the peak, the peak above the
model+batch baseline, and ratios to the plain DPO step measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SHAPES = {
    # name: (layers, width, heads, vocab, pairs, prompt, response)
    "long": (4, 256, 4, 8192, 8, 64, 192),
    "short": (4, 256, 4, 8192, 32, 32, 64),
    "gpt2-small": (12, 768, 12, 50257, 8, 64, 192),
    "tiny": (2, 64, 4, 1024, 2, 8, 16),                               # dry runs (benchmarks/gpu.sh --dry-run)
}
METHODS = ["plain_dpo_step", "auto", "exact", "torch_func"]
DTYPES = {"float32": "float32", "bf16": "bfloat16"}                    # --dtype: the torch dtype's name


def config_model(path: str, device: str, dtype: str = "float32", **overrides):
    """A randomly initialised causal LM built on ``device`` from a ``config.json`` (no weights, no download).

    ``overrides`` replace config values (e.g. ``num_hidden_layers=2``); ``dtype`` is a key of :data:`DTYPES`.
    Seeded, returned in eval mode.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = json.loads(Path(path).read_text())
    if "model_type" not in values:
        raise ValueError(f"{path}: a config.json needs 'model_type' to pick the model class")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**values, **overrides}),
                                                 dtype=getattr(torch, DTYPES[dtype]))
    return model.eval()


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _setup(shape: str, device: str, model_config: str | None = None, dtype: str = "float32",
           layers: int | None = None):
    """The shape's model and batch; with ``model_config`` the model is that config's (``layers`` overriding its
    depth) and only the shape's batch sizes are used."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, width, heads, vocab, pairs, prompt, resp = SHAPES[shape]
    if model_config:
        model = config_model(model_config, device, dtype, **({} if layers is None else {"num_hidden_layers": layers}))
        vocab = model.config.vocab_size
    else:
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=vocab, n_positions=prompt + resp + 64, n_embd=width, n_layer=n_layer,
                         n_head=heads, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg).to(device, getattr(torch, DTYPES[dtype])).eval()
    g = torch.Generator().manual_seed(0)
    n = 2 * pairs
    lens = [resp + int(x) for x in torch.randint(-resp // 6, resp // 6 + 1, (n,), generator=g)]
    width_ = prompt + max(lens)
    ids = torch.randint(1, vocab, (n, width_), generator=g)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]                       # pairs share their prompt
    att = torch.zeros(n, width_, dtype=torch.long)
    comp = torch.zeros(n, width_, dtype=torch.long)
    for i, r in enumerate(lens):
        att[i, :prompt + r] = 1
        comp[i, prompt:prompt + r] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": att.to(device), "completion_mask": comp.to(device)}
    return model, batch


def _run_method(method: str, model, batch):
    import torch

    from entangle.capture.logprobs import sequence_logps
    from entangle.capture.measure import sequence_gram

    if method == "plain_dpo_step":
        model.zero_grad(set_to_none=True)
        logps = sequence_logps(model, batch)
        b = logps.shape[0] // 2
        ref = logps.detach() - 0.1                                    # a reference model's log-probs
        margin = (logps[:b] - ref[:b]) - (logps[b:] - ref[b:])
        torch.nn.functional.logsigmoid(0.1 * margin).neg().mean().backward()
        model.zero_grad(set_to_none=True)
        return None
    if method in ("auto", "exact"):
        return sequence_gram(model, batch, method=method).matrix
    return _torch_func_gram(model, batch)


def _torch_func_gram(model, batch):
    """Per-sample gradients with torch.func.vmap(grad(...)) over sequences, then a float64 Gram."""
    import torch
    from torch.func import functional_call, grad, vmap

    from entangle.capture.logprobs import token_logps

    params = {k: v.detach() for k, v in model.named_parameters()}

    def logp(p, ids, att, comp):
        b = {"input_ids": ids[None], "attention_mask": att[None], "completion_mask": comp[None]}
        logits = functional_call(model, p, (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}).logits
        return token_logps(logits, b).sum()

    per = vmap(grad(logp), in_dims=(None, 0, 0, 0))(params, batch["input_ids"], batch["attention_mask"],
                                                    batch["completion_mask"])
    flat = torch.cat([v.flatten(1).to(torch.float64) for v in per.values()], 1)
    return flat @ flat.T


def child(shape: str, method: str, device: str, repeat: int, model_config: str | None = None,
          dtype: str = "float32") -> dict:
    import torch

    model, batch = _setup(shape, device, model_config, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    base = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else _vmhwm_mb()
    try:
        _run_method(method, model, batch)                              # warm-up
    except Exception as e:  # noqa: BLE001 - torch.func does not trace every model; report, don't crash
        return {"shape": shape, "method": method, "error": f"{type(e).__name__}: {str(e)[:120]}"}
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        _run_method(method, model, batch)
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _vmhwm_mb()
    return {"shape": shape, "method": method, "seconds": statistics.median(times), "peak_mb": peak,
            "above_base_mb": peak - base}


def run_child(script: str, child_args: list[str], device: str, repeat: int, row: dict,
              options: Sequence[str] = ()) -> dict:
    """Run ``script --child *child_args [*options]`` in a fresh process (its own VmHWM) and return its JSON row,
    or ``row`` with the child's last error line."""
    out = subprocess.run([sys.executable, script, "--child", *child_args, "--device", device, "--repeat",
                          str(repeat), *options], capture_output=True, text=True)
    if out.stdout.strip():
        result = json.loads(out.stdout.strip().splitlines()[-1])
    else:
        lines = out.stderr.strip().splitlines() or ["no output"]
        result = {**row, "error": lines[-1][:120]}
    print(f"  measured {' '.join(child_args)}", file=sys.stderr)
    return result


def main() -> None:
    args = parse_args(__doc__, ["long", "short"], METHODS)
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.repeat, args.model_config, args.dtype)))
        return
    rows = []
    for shape in args.shapes:
        for method in args.methods:
            if method == "exact" and shape == "gpt2-small" and args.device == "cpu":
                continue
            rows.append(run_child(__file__, [shape, method], args.device, args.repeat,
                                  {"shape": shape, "method": method}, model_options(args)))
    print_table(rows)


def parse_args(doc: str, shapes: list[str], methods: list[str]) -> argparse.Namespace:
    """The options a benchmark of (shape, method) rows shares: shapes, methods, device, repeats, the model, and the
    hidden ``--child SHAPE METHOD`` of its child processes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=shapes, choices=list(SHAPES))
    ap.add_argument("--methods", nargs="+", default=methods, choices=methods)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    add_model_options(ap)
    ap.add_argument("--child", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    return ap.parse_args()


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """``--model-config PATH`` and ``--dtype``, shared by the benchmark scripts."""
    ap.add_argument("--model-config", metavar="PATH",
                    help="build this config.json's model (random weights) instead of the GPT-2, e.g. "
                         "benchmarks/configs/qwen2.5-0.5b.json; the shape's batch sizes still apply")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the model's weights")


def model_options(args: argparse.Namespace) -> list[str]:
    """The options of :func:`add_model_options` as given, to pass on to a child process."""
    return ["--dtype", args.dtype, *(["--model-config", args.model_config] if args.model_config else [])]


def print_table(rows: list[dict]) -> None:
    """The markdown table; a row's ``ratio`` (time against the plain step, measured apart) is used when it has one."""
    base = {r["shape"]: r for r in rows if r["method"] == "plain_dpo_step" and "peak_mb" in r}
    print("| shape | method | time (s) | × plain step | peak RSS (MB) | × plain | above model+batch (MB) | × plain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['method']} | n/a: {r['error']} | | | | | |")
            continue
        b = base.get(r["shape"])
        rt = f"{r['ratio']:.2f}" if "ratio" in r else f"{r['seconds'] / b['seconds']:.2f}" if b else ""
        rp = f"{r['peak_mb'] / b['peak_mb']:.2f}" if b else ""
        ra = f"{r['above_base_mb'] / b['above_base_mb']:.2f}" if b and b["above_base_mb"] > 0 else ""
        print(f"| {r['shape']} | {r['method']} | {r['seconds']:.3f} | {rt} | {r['peak_mb']:.0f} | {rp} | "
              f"{r['above_base_mb']:.0f} | {ra} |")


if __name__ == "__main__":
    main()
