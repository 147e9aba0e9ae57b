"""The benchmark scripts run end to end on tiny settings and print the numbers the README quotes (no timing asserted)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_bench_callback_prints_overhead_and_lower_bound():
    out = _run("bench_callback.py", "--steps", "2", "--every", "1", "--repeats", "1", "--n-layer", "1",
               "--n-embd", "32", "--batch", "2", "--grad-accum", "2")
    assert "40 steps" not in out and "2 steps of 2 x 2 pairs" in out
    assert "(3 measurements; update check on, Adam view on, structure pairs)" in out
    base, with_cb = map(float, re.search(r"without callback: ([\d.]+) s\s+with callback: ([\d.]+) s", out).groups())
    overhead, fastest = map(float, re.search(r"overhead: ([+-][\d.]+)%  \(median over the 1 adjacent pairs of runs; "
                                             r"fastest runs ([+-][\d.]+)%", out).groups())
    assert base > 0 and with_cb > 0
    rounding = 100 * 0.005 * (1 / base + with_cb / base**2) + 0.05     # printed seconds have 2 decimals
    assert math.isclose(fastest, 100 * (with_cb / base - 1), abs_tol=rounding)
    assert math.isclose(overhead, fastest, abs_tol=0.11)               # one pair of runs: the same ratio
    bound = re.search(r"lower bound .* ~ ([\d.]+) optimizer steps -> ([+-][\d.]+)% at 3 measurements in 2 steps", out)
    steps, percent = map(float, bound.groups())
    assert steps > 0 and math.isclose(percent, 100 * steps * 3 / 2, abs_tol=100 * 0.005 * 3 / 2 + 0.05)


@pytest.mark.slow
def test_bench_tokens_prints_one_row_per_method():
    out = _run("bench_tokens.py", "--responses", "4", "--methods", "loop", "full", "head", "--layers", "1",
               "--repeat", "1")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| 1 \| \d+ \|", line)]
    assert [r[2].strip() for r in rows] == ["loop", "full", "head"]
    assert all(float(r[3]) > 0 for r in rows) and rows[0][4].strip() == "1.0×"


def test_qwen_config_builds_the_published_model_on_meta(monkeypatch):
    """benchmarks/configs/qwen2.5-0.5b.json builds Qwen2.5-0.5B's architecture (494,032,768 parameters) without weights."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_gram

    model = bench_gram.config_model(str(BENCH / "configs" / "qwen2.5-0.5b.json"), "meta", "bf16")
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and cfg.model_type == "qwen2"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (896, 24, 14, 2, 4864, 151936)
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.rms_norm_eps == 1e-6
    assert model.lm_head.weight is model.model.embed_tokens.weight                  # tied embeddings
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"meta"}
    tiny = bench_gram.config_model(str(BENCH / "configs" / "qwen2-tiny.json"), "meta", num_hidden_layers=1)
    assert type(tiny).__name__ == "Qwen2ForCausalLM" and len(tiny.model.layers) == 1


def test_gpu_script_parses_and_refuses_a_missing_output_folder(tmp_path):
    script = str(BENCH / "gpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "give an output folder" in done.stderr
    done = subprocess.run(["bash", script, "--budget", "soon", str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "--budget must be whole seconds" in done.stderr
    done = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "bash benchmarks/gpu.sh OUTDIR" in done.stdout


def test_bench_mitigate_rows_and_table(monkeypatch, capsys, one_thread):
    """Each method's step fills .grad; the child rows (run in-process here: the child processes are bench_gram's
    run_child) print against the plain step."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_gram
    import bench_mitigate

    model, batch = bench_gram._setup("tiny", "cpu")
    for method in bench_mitigate.METHODS:
        bench_mitigate.make_step(method, model, batch)()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), method
    timed = bench_mitigate.child("tiny", "interleaved:plain_dpo_step,pairwise_normalized", "cpu", 2)
    assert timed["plain_dpo_step"]["ratio"] == 1.0
    bench_mitigate.print_rows([{**bench_mitigate.child("tiny", m, "cpu", 1), **timed[m]} for m in timed])
    table = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [r[1].strip() for r in table] == ["plain_dpo_step", "pairwise_normalized"]
    assert table[0][3].strip() == "1.00" and float(table[1][2]) > 0 and float(table[1][3]) > 0


@pytest.mark.slow
def test_bench_inpass_prints_every_variant_against_no_hooks():
    out = _run("bench_inpass.py", "--micro", "2", "--accum", "2", "--rounds", "1", "--threads", "1")
    assert "2 per run, 2 per recording, 1 rounds, 28 hooked modules, 1 threads" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    assert list(rows) == ["no hooks", "no-op forward hooks", "no-op forward + output hooks",
                          "PassRecorder, reductions off", "PassRecorder"]
    base = float(rows["no hooks"][0])
    assert rows["no hooks"][1].strip() == "+0.0%" and base > 0
    for ms, overhead in rows.values():                # each overhead is its own median against the base's
        assert math.isclose(float(overhead.strip().rstrip("%")), 100 * (float(ms) / base - 1), abs_tol=0.2)


def test_bench_affine_times_both_forms_and_names_the_picked_one():
    """Both forms of the within-pair affine products run (and agree, or the script raises) at a length below and one
    above SPLIT_PAIRS; the table names the form the library picks."""
    out = _run("bench_affine.py", "--lengths", "4", "40", "--layers", "1", "--width", "8", "--rounds", "1",
               "--threads", "1")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "ms" not in line}
    assert rows["4"].rstrip(" |").endswith("one") and rows["40"].rstrip(" |").endswith("three"), out
    for line in rows.values():
        one, three, ratio = (float(v) for v in line.split("|")[2:5])
        assert one > 0 and three > 0 and ratio == pytest.approx(three / one, rel=0.05, abs=0.02)
