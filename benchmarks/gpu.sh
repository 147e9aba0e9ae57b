#!/usr/bin/env bash
# The Gram, callback and token-map benchmarks on one CUDA GPU at a realistic width, in one prepared run.
#
#   bash benchmarks/gpu.sh OUTDIR                 # OUTDIR defaults to $OUT when that is set
#   bash benchmarks/gpu.sh --dry-run OUTDIR       # CPU, the tiny Qwen2 config, tiny sizes: every step in ~2 min
#   options: --budget SECONDS (total, default 480)  --wheels DIR (pip-install DIR/*.whl first, offline)
#   the same by environment: GPU_SH_DRY_RUN=1, GPU_SH_BUDGET, GPU_SH_WHEELS; PYTHON picks the interpreter
#
# Model: benchmarks/configs/qwen2.5-0.5b.json (the published Qwen2.5-0.5B config.json; see configs/README.md),
# built with random weights in bf16 directly on the GPU; nothing is downloaded. The benchmarks' batch shapes are
# those of the CPU tables in README.md "Performance". On CUDA the "peak" columns are
# torch.cuda.max_memory_allocated of each child process, not RSS.
#
# Parts, in this order, each under its own time budget (seconds) and all under --budget; a part that fails or
# runs out of time is reported and the next one runs. The budgets are estimates (about 8 s to start each child
# process, the rest from the model's size), not measurements: the script has not run on a GPU yet.
#   gram_long     bench_gram.py  long shape (8 pairs, ~256 tokens): plain DPO step, auto, exact
#   gram_short    bench_gram.py  short shape (32 pairs): plain DPO step, auto. No exact: 64 float64
#                 per-sequence gradients of 494M parameters are 253 GB
#   callback      bench_callback.py  the default TRL DPO run (40 steps of 8 x 2 pairs, probe 16), 2 repeats
#   tokens_loop   bench_tokens.py  one pair, ~8 response tokens a side, all methods. The per-token loop keeps a
#                 float32 gradient of the whole model per token (2 GB each), so it only fits short responses
#   tokens_growth bench_tokens.py  --responses 16 64 (the CPU table's lengths), block-wise, prefix copies, head
#
# Writes OUTDIR/facts.txt (nvidia-smi, torch, device, versions), OUTDIR/tables.md (each part's command, status and
# markdown tables) and OUTDIR/logs.txt (each part's stderr). Exits 1 when CUDA is absent (unless --dry-run) or a
# package is missing, 2 on a usage error, 3 when a part failed or ran out of time.
#
# Packages: torch, transformers, trl, datasets and entangle's own dependencies; entangle itself is imported from
# this checkout. On an offline machine bring the missing ones as wheels, e.g.
#   pip download --no-deps --only-binary=:all: -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
#       multiprocess==0.70.19 transformers==5.24.0
# and pass --wheels .whl.

set -uo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu.sh: $1" >&2; exit "${2:-2}"; }

DRY=${GPU_SH_DRY_RUN:-0}
BUDGET=${GPU_SH_BUDGET:-480}
WHEELS=${GPU_SH_WHEELS:-}
OUTDIR=
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --budget) [ $# -ge 2 ] || die "--budget needs SECONDS"; BUDGET=$2; shift ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$OUTDIR" ] || die "one output folder only, got '$OUTDIR' and '$1'"; OUTDIR=$1 ;;
    esac
    shift
done
OUTDIR=${OUTDIR:-${OUT:-}}
[ -n "$OUTDIR" ] || die "give an output folder: bash benchmarks/gpu.sh OUTDIR (or set OUT)"
[[ $BUDGET =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, not '$BUDGET'"
mkdir -p "$OUTDIR" || die "cannot create the output folder $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "$WHEELS" ]; then
    compgen -G "$WHEELS/*.whl" >/dev/null || die "--wheels $WHEELS: no .whl files there" 1
    SITE=$(mktemp -d)
    trap 'rm -rf "$SITE"' EXIT
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
        || die "pip could not install the wheels in $WHEELS" 1
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
fi

if [ "$DRY" = 1 ]; then
    DEVICE=cpu CONFIG=benchmarks/configs/qwen2-tiny.json
else
    DEVICE=cuda CONFIG=benchmarks/configs/qwen2.5-0.5b.json
fi
LAYERS=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["num_hidden_layers"])' "$CONFIG") \
    || die "cannot read num_hidden_layers from $CONFIG" 1
MODEL=(--device "$DEVICE" --dtype bf16 --model-config "$CONFIG")

# ---- facts ------------------------------------------------------------------------------------------------------
{
    echo "# gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)  mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU)' || echo CUDA)"
    echo "checkout: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git')" \
         "$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo '(with uncommitted changes)')"
    echo "model: $CONFIG ($LAYERS layers), bf16, random weights; budget ${BUDGET}s"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    echo "CPU cores: $(nproc)"
} 2>&1 | tee "$OUTDIR/facts.txt"

"$PY" - "$DRY" <<'EOF' 2>&1 | tee -a "$OUTDIR/facts.txt"
import importlib
import platform
import sys

import torch

print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}, built for CUDA "
      f"{torch.version.cuda}; cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs, bf16 supported: {torch.cuda.is_bf16_supported()}; "
          f"{torch.cuda.device_count()} device(s) visible")
missing = []
for name in ("transformers", "trl", "datasets", "accelerate", "pandas", "matplotlib", "entangle"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as e:  # noqa: BLE001 - report every missing package, then fail
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("missing packages: " + "; ".join(missing) + " -- install them or pass --wheels DIR (see the header)")
if sys.argv[1] != "1" and not torch.cuda.is_available():
    sys.exit("CUDA is not available to torch: this script measures on a GPU (use --dry-run for a CPU check)")
EOF
status=${PIPESTATUS[0]}
[ "$status" = 0 ] || die "stopping: see the line above (facts in $OUTDIR/facts.txt)" 1

# ---- parts: name | budget (s) | script and its arguments (the model options are added) ------------------------
if [ "$DRY" = 1 ]; then
    PARTS=(
        "gram_long|60|bench_gram.py --shapes tiny --methods plain_dpo_step auto exact --repeat 1"
        "gram_short|40|bench_gram.py --shapes tiny --methods auto --repeat 1"
        "callback|90|bench_callback.py --steps 2 --every 1 --repeats 1 --probe 2 --batch 1 --grad-accum 2"
        "tokens_loop|60|bench_tokens.py --responses 2 --methods loop full --layers $LAYERS --repeat 1"
        "tokens_growth|60|bench_tokens.py --responses 2 4 --methods head --layers $LAYERS --repeat 1"
    )
else
    PARTS=(
        "gram_long|90|bench_gram.py --shapes long --methods plain_dpo_step auto exact --repeat 3"
        "gram_short|60|bench_gram.py --shapes short --methods plain_dpo_step auto --repeat 3"
        "callback|150|bench_callback.py --repeats 2"
        "tokens_loop|80|bench_tokens.py --responses 8 --layers $LAYERS --repeat 2"
        "tokens_growth|100|bench_tokens.py --responses 16 64 --methods full copies head --layers $LAYERS --repeat 2"
    )
fi

TABLES=$OUTDIR/tables.md LOGS=$OUTDIR/logs.txt
head -3 "$OUTDIR/facts.txt" >"$TABLES"
: >"$LOGS"
deadline=$((SECONDS + BUDGET))
failed=()
for part in "${PARTS[@]}"; do
    IFS='|' read -r name seconds command <<<"$part"
    read -ra args <<<"$command"
    left=$((deadline - SECONDS))
    limit=$((seconds < left ? seconds : left))
    echo
    echo "## $name: python benchmarks/${args[*]} ${MODEL[*]}" | tee -a "$TABLES"
    if [ "$limit" -lt 10 ]; then
        echo "skipped: the total budget of ${BUDGET}s is spent" | tee -a "$TABLES"
        failed+=("$name (skipped)")
        continue
    fi
    start=$SECONDS
    echo "==== $name" >>"$LOGS"
    # stdout is the tables; the Trainer's per-step log dicts (bench_callback) go to the logs
    timeout -k 10 "$limit" "$PY" "benchmarks/${args[0]}" "${args[@]:1}" "${MODEL[@]}" 2>>"$LOGS" \
        | tee -a "$LOGS" | grep --line-buffered -v "^{'" | tee -a "$TABLES"
    rc=${PIPESTATUS[0]}
    took=$((SECONDS - start))
    case $rc in
        0) echo "($name: ${took}s)" | tee -a "$TABLES" ;;
        124|137) echo "TIMED OUT after ${took}s (budget ${limit}s): the scripts print their tables at the end, so" \
                      "this part has none; logs.txt names the rows it measured" | tee -a "$TABLES"
                 failed+=("$name (timed out)") ;;
        *) echo "FAILED (exit $rc after ${took}s); its stderr ends:" | tee -a "$TABLES"
           tail -n 5 "$LOGS" | sed 's/^/    /' | tee -a "$TABLES"
           failed+=("$name (exit $rc)") ;;
    esac
done

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu.sh: done in ${SECONDS}s; not complete: ${failed[*]}. Tables: $TABLES, logs: $LOGS" | tee -a "$TABLES"
    exit 3
fi
echo "gpu.sh: done in ${SECONDS}s, every part complete. Tables: $TABLES, logs: $LOGS" | tee -a "$TABLES"
