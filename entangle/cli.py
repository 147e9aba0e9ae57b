"""The ``entangle`` command line.

Each subcommand is one function ``(args) -> exit code`` registered with :func:`subcommand`, together with a
function that adds its arguments to its parser. Adding a subcommand (``analyze``, ``demo``, ...) means writing
those two functions; :func:`main` builds the parser from :data:`COMMANDS` and turns the project's known errors
into one line on stderr and a non-zero exit code.

    entangle gram --model builtin --data builtin --n-pairs 8 --out gram-out
    entangle report RUN_DIR [--out DIR] [--data PAIRS]
    entangle filter RUN_DIR --data PAIRS --out FILE (--drop-top 0.1 | --weight)
    entangle analyze RUN_DIR --data PAIRS --objective sigmoid --beta 0.1 [--out OUT]
    entangle demo [--model NAME_OR_DIR --data PAIRS]
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entangle import __version__
from entangle._warnings import filter_known_warnings


class CLIError(Exception):
    """A usage problem found by a subcommand; printed as one line, exit code 1."""


# Errors shown to the user as one line (no traceback): bad input rather than a bug in entangle (entangle.data's
# PairError is a ValueError, FileNotFoundError an OSError).
KNOWN_ERRORS: tuple[type[BaseException], ...] = (CLIError, ValueError, OSError, KeyError)


@dataclass(frozen=True)
class Subcommand:
    """A registered subcommand: its name, one-line help, argument adder and runner."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated ``run(args) -> int`` as subcommand ``name`` with ``arguments(parser)``."""

    def deco(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} is already registered")
        COMMANDS[name] = Subcommand(name, help, arguments, run)
        return run

    return deco


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (the usage is behind ``--help``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def note(message: str) -> None:
    """A one-line note for the user on stderr (stdout stays for results)."""
    print(f"note: {message}", file=sys.stderr)


# ---- option values, checked when the command line is parsed -------------------------------------------------

def _number(kind: Callable[[str], Any], text: str, ok: Callable[[Any], bool], what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _number(int, text, lambda v: v >= 1, "an integer of at least 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _number(int, text, lambda v: v >= 0, "an integer of at least 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (every objective's ``beta`` is one)."""
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a positive number")


def device_name(text: str) -> str:
    """argparse type for ``--device``: ``auto`` becomes ``cuda`` when CUDA is available, else ``cpu``; any other
    value must name a device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``xpu``, ...)."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cpu":
        return text
    backend = getattr(torch, device.type, None)
    if not (hasattr(backend, "is_available") and backend.is_available()):
        why = ""
        if device.type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
            why = f" (torch {torch.__version__} is a build without CUDA)"
        raise argparse.ArgumentTypeError(f"{device.type.upper()} is not available on this machine{why}")
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} {device.type.upper()} device(s), "
                                         "numbered from 0")
    return text


# a hub model name: ``name`` or ``owner/name``; anything else is a path
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (never in offline mode, HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # no answer, whatever the reason (no network, DNS, proxy, timeout): treat it as unreachable
        return False
    return True


def pretrained_source(name: str, option: str, needs: Sequence[str] = ("config.json",)) -> str:
    """Where to load the value ``name`` of ``option`` from, checked before anything is loaded.

    A local directory must hold one of the files ``needs``. Any other value must be a hub name: it is returned
    as it is when the hub answers (transformers downloads it), or as the folder of its cached copy when the hub
    cannot be reached quickly, so that loading it does not retry the network for minutes. Raises ``CLIError``
    naming the option otherwise.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in needs):
            raise CLIError(f"{option} {name!r} is not a model directory (no {' or '.join(needs)})")
        return name
    if path.exists() or not HUB_NAME.fullmatch(name):
        raise CLIError(f"{option} {name!r}: " + ("not a directory" if path.exists() else "no such directory"))
    if _hub_reachable():
        return name
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:
        raise CLIError(f"{option} {name!r} is neither a local model directory nor a cached hub model, and the hub "
                       f"({constants.ENDPOINT}) cannot be reached") from None


# ---- gram ----------------------------------------------------------------------------------------------------

def _gram_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin",
                   help="a local model directory, a hub name, or 'builtin' (small GPT-2 built from code; default)")
    p.add_argument("--data", default="builtin",
                   help="preference pairs: a .jsonl/.json/.parquet/.csv file, or 'builtin' (default)")
    p.add_argument("--n-pairs", type=positive_int, default=8, help="number of pairs to measure (default 8)")
    p.add_argument("--params", default=None,
                   help="parameters to measure: a regex searched in parameter names, or 'lora' (default: all trainable)")
    p.add_argument("--objective", default="sigmoid", help="preference objective (default sigmoid = DPO)")
    p.add_argument("--beta", type=positive_float, default=None,
                   help="the objective's beta (default: the objective's own)")
    p.add_argument("--max-length", type=positive_int, default=None, help="cut each sequence to this many tokens")
    p.add_argument("--device", type=device_name, default="auto",
                   help="cpu, cuda, cuda:1, mps, ... (default: cuda when available)")
    p.add_argument("--out", default=None,
                   help="write the pair frame, summary and layer tables here as a run directory (entangle report reads it)")


def load_rows(data: str, n_pairs: int) -> list[dict]:
    """The first ``n_pairs`` preference pairs of ``data`` (a file, or ``builtin``)."""
    if data == "builtin":
        from entangle.builtin import builtin_pairs

        return builtin_pairs(n_pairs)
    from entangle.data import load_pairs

    rows = load_pairs(data)[:n_pairs]
    if not rows:
        raise CLIError(f"no usable preference pairs in {data!r}")
    return rows


def _print_gram(frame: Any, summary: Any) -> None:
    import pandas as pd

    cols = ["pair"] + (["kind"] if "kind" in frame else []) + ["len_chosen", "len_rejected", "cosine", "ratio",
                                                               "regime"]
    with pd.option_context("display.width", 120, "display.max_rows", 200, "display.float_format", "{:.3f}".format):
        print(frame[cols].to_string(index=False))
    s = summary.iloc[0]
    shares = ", ".join(f"{r.replace('_', ' ')} {100 * s[f'share_{r}']:.0f}%"
                       for r in ("ideal", "both_rise", "both_fall") if f"share_{r}" in s)
    print(f"\n{int(s['n_pairs'])} pairs: {shares}; median cosine {s['cosine_q50']:.3f}, "
          f"median ratio {s['ratio_q50']:.3f}, ranking accuracy {s['ranking_accuracy']:.3f}")


@subcommand("gram", "measure the gradient Gram matrix of a model on preference pairs", _gram_arguments)
def gram(args: argparse.Namespace) -> int:
    """Measure one model on pairs: per-pair cosine, ratio and regime, and their summary."""
    from entangle.capture.measure import sequence_gram
    from entangle.data import encode_pairs
    from entangle.demo import load_model_and_tokenizer
    from entangle.metrics import pair_frame, resolve_objective, summarize

    objective = resolve_objective(args.objective)
    hyper = {}
    if args.beta is not None:
        if "beta" not in objective.hyper_names:
            raise CLIError(f"objective {objective.name!r} has no beta; its hyper-parameters are "
                           f"{sorted(objective.hyper_names) or 'none'}")
        hyper["beta"] = args.beta
    source = None if args.model == "builtin" else pretrained_source(args.model, "--model")
    rows = load_rows(args.data, args.n_pairs)
    model, tokenizer = load_model_and_tokenizer(source)
    model.to(args.device).eval()
    batch = {k: v.to(args.device) for k, v in encode_pairs(tokenizer, rows, max_length=args.max_length).items()}
    params = args.params
    result = sequence_gram(model, batch, params=params)
    ref = None
    if objective.needs_ref:
        ref = result.logps
        note("reference model = the measured model itself (as at the start of DPO training)")
    extra = {"kind": [r["kind"] for r in rows]} if all("kind" in r for r in rows) else {}
    frame = pair_frame(result, objective, ref, step=0, **hyper, **extra)
    summary = summarize(frame)
    _print_gram(frame, summary)
    if args.out:
        from entangle.metrics.tables import layer_frame
        from entangle.runio import RunWriter

        writer = RunWriter(args.out)
        writer.write("pairs", frame, step=0)
        writer.write("summary", summary, step=0)
        writer.write("layers", layer_frame(result, 0, range(len(rows))), step=0)
        writer.write_manifest({"command": "entangle gram", "model": args.model, "data": args.data,
                               "n_pairs": len(rows), "objective": objective.name, **frame.attrs.get("hyper", {}),
                               "params": params or "all trainable"})
        print(f"\nwrote {args.out}")
    return 0


# ---- report ---------------------------------------------------------------------------------------------------

def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (from the callback, entangle analyze or entangle gram --out)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    p.add_argument("--format", nargs="+", default=["png"], choices=["png", "pdf", "svg"],
                   help="figure file formats beside report.html (default png)")
    p.add_argument("--data", default=None,
                   help="the training dataset (any file load_pairs reads), for the text of the most entangled "
                        "training pairs of a run with a train_pairs table")


@subcommand("report", "write the figures and a self-contained report.html of a run directory", _report_arguments)
def report(args: argparse.Namespace) -> int:
    """Write the report of a run directory and print the HTML's path."""
    from entangle.report import make_report

    texts = None
    if args.data is not None:
        from entangle.filtering import read_dataset
        from entangle.metrics.dataset import pair_texts

        texts = pair_texts(read_dataset(args.data))
    print(make_report(args.run_dir, args.out, formats=args.format, texts=texts))
    return 0


# ---- filter ---------------------------------------------------------------------------------------------------

def fraction(text: str) -> float:
    """argparse type: a fraction above 0 and at most 1."""
    return _number(float, text, lambda v: 0 < v <= 1, "a fraction above 0 and at most 1")


def _filter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory with a train_pairs table (EntanglementCallback(train_every=k))")
    p.add_argument("--data", required=True,
                   help="the dataset the run trained on (.jsonl/.json/.parquet/.csv, as load_pairs reads it): "
                        "train_pairs' index is the row of trainer.train_dataset, so DATA's rows must be those, in "
                        "that order (true when you trained on this file and the trainer dropped no row; TRL drops "
                        "pairs whose prompt alone reaches max_length)")
    p.add_argument("--out", required=True,
                   help="the filtered dataset: .jsonl or .parquet, prompt/chosen/rejected as DATA has them")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--drop-top", type=fraction, metavar="FRACTION",
                     help="drop this fraction of the measured rows, those with the highest mean gradient cosine")
    how.add_argument("--weight", action="store_true",
                     help="keep every row and add a column weight = 1 - max(mean cosine, 0) (1 for rows never "
                          "measured); TRL's DPOTrainer has no per-row loss weight: use it as sampling weights")


@subcommand("filter", "write a training dataset without (or down-weighting) its most entangled pairs",
            _filter_arguments)
def filter_(args: argparse.Namespace) -> int:
    """Filter DATA by the entanglement RUN measured on it; print what was kept and the output's path."""
    from entangle import filtering

    out = filtering.check_output_path(args.out)
    train_pairs = filtering.read_train_pairs(args.run_dir)
    rows = filtering.read_dataset(args.data)
    done = filtering.filter_pairs(rows, train_pairs, drop_top=args.drop_top, weight=args.weight)
    print(f"{len(rows)} rows in {args.data}: {done.n_measured} measured, {done.n_unmeasured} never measured (kept)")
    if args.weight:
        print(f"weight = 1 - max(mean cosine, 0): min {done.weights.min():.3f}, mean {done.weights.mean():.3f}")
    else:
        cut = f" (mean cosine >= {done.threshold:.3f})" if done.dropped else ""
        print(f"dropped {len(done.dropped)} of the {done.n_measured} measured rows{cut}")
    filtering.write_pairs(done.rows, out)
    print(f"wrote {len(done.rows)} rows to {out}")
    return 0


# ---- analyze --------------------------------------------------------------------------------------------------

def _analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a transformers/TRL output directory with checkpoint-* folders, or one model directory")
    p.add_argument("--data", required=True,
                   help="probe preference pairs: a .jsonl/.json/.parquet/.csv file, or 'builtin'")
    p.add_argument("--objective", default="sigmoid", help="preference objective (default sigmoid = DPO)")
    p.add_argument("--beta", type=positive_float, default=None,
                   help="the objective's beta (default: the objective's own)")
    p.add_argument("--ref-model", default=None,
                   help="reference model directory (default: adapters disabled for PEFT checkpoints, "
                        "else the first checkpoint)")
    p.add_argument("--out", default=None, help="output run directory (default RUN_DIR/entangle-analysis)")
    p.add_argument("--max-pairs", type=positive_int, default=None,
                   help="measure only the first N pairs (builtin: default 64)")
    p.add_argument("--max-length", type=positive_int, default=None, help="cut each sequence to this many tokens")
    p.add_argument("--params", default=None,
                   help="parameters to measure: a regex searched in parameter names, or 'lora' (default: all trainable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: found beside the checkpoints)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="cpu, cuda, cuda:1, mps, ... (default: cuda when available)")


@subcommand("analyze", "measure every checkpoint of a training run on probe pairs (resumable)", _analyze_arguments)
def analyze(args: argparse.Namespace) -> int:
    """Measure a checkpoint series into a run directory; print notes on skipped checkpoints and the directory."""
    from entangle.integrations.checkpoints import TOKENIZER_FILES
    from entangle.integrations.checkpoints import analyze as analyze_checkpoints
    from entangle.runio import read_manifest

    ref_model = args.ref_model and pretrained_source(args.ref_model, "--ref-model",
                                                     ("config.json", "adapter_config.json"))
    tokenizer = args.tokenizer and pretrained_source(args.tokenizer, "--tokenizer", TOKENIZER_FILES)
    rows = load_rows(args.data, args.max_pairs or (64 if args.data == "builtin" else sys.maxsize))
    # each skipped checkpoint is printed once, as a note below, not also as the library's logged warning
    quiet = logging.getLogger("entangle.integrations.checkpoints")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        out = analyze_checkpoints(
            args.run_dir, rows, out=args.out, objective=args.objective, ref_model=ref_model, params=args.params,
            max_length=args.max_length, tokenizer=tokenizer, device=args.device,
            **({} if args.beta is None else {"beta": args.beta}))
    finally:
        quiet.setLevel(level)
    manifest = read_manifest(out)
    for s in manifest.get("skipped", []):
        note(f"skipped {s['checkpoint']}: {s['reason']}")
    steps = manifest.get("measured_steps", [])
    note(f"{len(steps)} checkpoint step(s) in the run directory: {', '.join(map(str, steps))}")
    print(out)
    return 0


# ---- demo -----------------------------------------------------------------------------------------------------

def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from entangle.demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out}): run/ tables and report/")
    p.add_argument("--model", default=None, help="a local model directory or hub name (default: built-in GPT-2)")
    p.add_argument("--data", default=None, help="preference pairs, any format load_pairs reads (default: built-in)")
    p.add_argument("--n-train", type=positive_int, default=d.n_train, help="DPO training pairs")
    p.add_argument("--n-probe", type=positive_int, default=None,
                   help=f"probe pairs measured by the callback (default {d.n_probe}; 16 with --compare)")
    p.add_argument("--sft-steps", type=non_negative_int, default=d.sft_steps,
                   help="supervised warm-up steps on chosen responses")
    p.add_argument("--dpo-steps", type=positive_int, default=None,
                   help=f"DPO training steps (default {d.dpo_steps}; 40 with --compare)")
    p.add_argument("--every", type=positive_int, default=d.every, help="measure the probe every N steps")
    p.add_argument("--beta", type=positive_float, default=d.beta, help="DPO beta")
    p.add_argument("--max-length", type=positive_int, default=None, help="truncate sequences to this many tokens")
    p.add_argument("--compare", action="store_true",
                   help="train with DPO, DPO + NLL, DPO-Positive, pairwise normalised and token-masked DPO side by "
                        "side and write one comparison (entangle.compare; default --out entangle-compare)")
    p.add_argument("--methods", default=None, help="with --compare: a comma-separated subset of the methods")


@subcommand("demo", "train a small model with DPO on a built-in task (or yours) and report its entanglement",
            _demo_arguments)
def demo(args: argparse.Namespace) -> int:
    """Run the whole pipeline; the demo prints its summary and the report's path."""
    from entangle.demo import DemoConfig, run_demo

    model = args.model and pretrained_source(args.model, "--model")
    given = {k: v for k, v in (("n_probe", args.n_probe), ("dpo_steps", args.dpo_steps)) if v is not None}
    common = dict(model=model, data=args.data, n_train=args.n_train, sft_steps=args.sft_steps, every=args.every,
                  beta=args.beta, max_length=args.max_length, **given)
    if args.compare:
        from entangle.compare import CompareConfig, run_compare

        methods = {"methods": tuple(m.strip() for m in args.methods.split(","))} if args.methods else {}
        out = {} if args.out == DemoConfig.out else {"out": args.out}
        run_compare(CompareConfig(**common, **methods, **out))
        return 0
    if args.methods:
        raise ValueError("--methods needs --compare")
    run_demo(DemoConfig(out=args.out, **common))
    return 0


# ---- plan -----------------------------------------------------------------------------------------------------

def _plan_arguments(p: argparse.ArgumentParser) -> None:
    from entangle.plan import BUNDLED

    p.add_argument("--model", required=True,
                   help=f"a config.json, a model directory, or a bundled config: {', '.join(BUNDLED)}")
    p.add_argument("--pairs", type=positive_int, required=True, help="preference pairs per optimizer step (all GPUs)")
    p.add_argument("--prompt", type=positive_int, required=True, help="prompt tokens per sequence")
    p.add_argument("--response", type=positive_int, required=True, help="response tokens per sequence")
    p.add_argument("--probe", type=positive_int, default=None, help="probe pairs measured (default: --pairs)")
    p.add_argument("--world-size", type=positive_int, default=1, help="GPUs under FSDP (default 1)")
    p.add_argument("--dtype", choices=["bf16", "float32"], default="bf16", help="the weights' dtype (default bf16)")
    p.add_argument("--structure", choices=["pairs", "full"], default="pairs",
                   help="per-pair statistics (the callback's; default) or the whole Gram matrix")
    p.add_argument("--in-pass", action="store_true", help="capture inside the trainer's own pass (no probe pass)")
    p.add_argument("--out", default=None, help="also write the per-layer-type table to this CSV file")


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


@subcommand("plan", "FLOPs and memory of one measurement next to one training step, from a model's config alone",
            _plan_arguments)
def plan(args: argparse.Namespace) -> int:
    """Print the per-layer-type cost table and the totals per GPU; write the table as CSV with ``--out``."""
    import pandas as pd

    from entangle.plan import plan as cost_plan

    frame = cost_plan(args.model, pairs=args.pairs, prompt=args.prompt, response=args.response,
                      world_size=args.world_size, dtype=args.dtype, structure=args.structure,
                      in_pass=args.in_pass, probe=args.probe)
    t = frame.attrs["totals"]
    shown = frame.assign(train=frame["train_flops"].map(lambda v: _si(v, "FLOP")),
                         measurement=frame["measure_flops"].map(lambda v: _si(v, "FLOP")),
                         products=frame["product_flops"].map(lambda v: _si(v, "FLOP")),
                         largest_buffers=frame["product_bytes"].map(_gib))
    with pd.option_context("display.width", 160, "display.max_colwidth", 60):
        print(shown[["layer_type", "uses", "method", "train", "measurement", "products", "largest_buffers"]]
              .to_string(index=False))
    what = "in-pass capture" if t["in_pass"] else f"measurement of {t['probe']} probe pairs"
    print(f"\n{t['parameters']:,} parameters, {t['dtype']}, {t['world_size']} GPU(s); per GPU: "
          f"{t['train_sequences_per_gpu']} training sequences, {t['measure_sequences_per_gpu']} measured, "
          f"{t['prompt']} + {t['response']} tokens each")
    print(f"one {what}: {_si(t['measure_flops'], 'FLOP')} = {t['flop_ratio']:.3f} x a training step "
          f"({_si(t['train_flops'], 'FLOP')})")
    print(f"memory per GPU: training step peak {_gib(t['train_peak_bytes'])} (weights {_gib(t['weights_bytes'])}, "
          f"reference {_gib(t['reference_bytes'])}, gradients {_gib(t['gradients_bytes'])}, "
          f"Adam {_gib(t['adam_bytes'])}, unsharded FSDP units {_gib(t['fsdp_unsharded_bytes'])}, "
          f"activations {_gib(t['activation_bytes'])}); measurement +{_gib(t['measure_extra_bytes'])} -> peak "
          f"{_gib(t['measure_peak_bytes'])} = {t['memory_ratio']:.2f} x the training step's")
    if args.out:
        frame.to_csv(args.out, index=False)
        print(f"\nwrote {args.out}")
    return 0


# ---- entry point ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``entangle`` parser with one sub-parser per registered subcommand."""
    parser = _Parser(prog="entangle", description="Measure gradient entanglement in DPO-style preference training.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        cmd.add_arguments(subs.add_parser(cmd.name, help=cmd.help, description=cmd.help))
    return parser


def _one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split()) or type(err).__name__
    return f"missing key or column {text}" if isinstance(err, KeyError) else text


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``entangle`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    filter_known_warnings()
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except KNOWN_ERRORS as err:
        print(f"entangle {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
