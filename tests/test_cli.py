"""The ``entangle`` command line: gram and report end to end, and one-line errors."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import _one_line_error

import entangle
from entangle.builtin import builtin_model, builtin_tokenizer
from entangle.cli import COMMANDS, main, pretrained_source
from entangle.runio import read_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one thread


def test_subcommands_are_registered():
    assert {"gram", "report"} <= set(COMMANDS)


def test_gram_then_report_on_builtin(tmp_path, capsys):
    out = tmp_path / "gram"
    assert main(["gram", "--model", "builtin", "--data", "builtin", "--n-pairs", "4", "--beta", "0.2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cosine" in printed and "regime" in printed and "4 pairs:" in printed
    run = read_run(out)
    pairs, summary = run["pairs"], run["summary"]
    assert len(pairs) == 4 and list(pairs["kind"]) == ["last_token", "short_suffix", "long_suffix", "unrelated"]
    assert len(summary) == 1 and summary["n_pairs"].item() == 4
    assert set(run["layers"]["layer"]) >= {"embed", "layer 0", "layer 1"}
    assert run["manifest"]["objective"] == "sigmoid" and run["manifest"]["beta"] == 0.2
    # every pair's ratio is printed to 3 decimals
    for ratio in pairs["ratio"]:
        assert f"{ratio:.3f}" in printed

    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    html = tmp_path / "rep" / "report.html"
    assert capsys.readouterr().out.strip() == str(html)
    assert html.exists() and (tmp_path / "rep" / "regime_plane.png").exists()
    assert "the run has no updates table" in html.read_text()


def test_gram_reads_a_data_file_and_a_parameter_filter(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "review : the movie was", "chosen": " great", "rejected": " awful"},
            {"prompt": "review : the film was", "chosen": " superb", "rejected": " dull"}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["gram", "--data", str(data), "--params", r"^transformer\.h\.", "--objective", "simpo"]) == 0
    printed = capsys.readouterr().out
    assert "2 pairs:" in printed and "kind" not in printed


@pytest.mark.parametrize("argv, match", [
    (["report", "{tmp}/missing"], "does not exist"),
    (["report", "{tmp}/empty"], "no pairs or summary table"),
    (["gram", "--objective", "nope", "--n-pairs", "2"], "unknown objective 'nope'"),
    (["gram", "--data", "{tmp}/bad.jsonl"], "missing field(s) ['rejected']"),
    (["gram", "--data", "{tmp}/absent.jsonl"], "data file '{tmp}/absent.jsonl' does not exist"),
    (["demo", "--data", "{tmp}/absent.jsonl", "--out", "{tmp}/d"], "data file '{tmp}/absent.jsonl' does not exist"),
    (["gram", "--data", "{tmp}/broken.jsonl"], "{tmp}/broken.jsonl: line 2: not valid JSON (Expecting value, column 1)"),
    (["gram", "--model", "{tmp}/no-model"], "--model '{tmp}/no-model': no such directory"),
    (["gram", "--model", "{tmp}/bad.jsonl"], "--model '{tmp}/bad.jsonl': not a directory"),
    (["gram", "--model", "{tmp}/empty"], "--model '{tmp}/empty' is not a model directory (no config.json)"),
    (["demo", "--model", "{tmp}/empty", "--out", "{tmp}/d"],
     "--model '{tmp}/empty' is not a model directory (no config.json)"),
    (["analyze", "{tmp}/empty", "--data", "builtin", "--tokenizer", "{tmp}/empty"],
     "--tokenizer '{tmp}/empty' is not a model directory (no tokenizer_config.json or tokenizer.json or"),
    (["gram", "--objective", "sft", "--beta", "0.1"], "has no beta"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    (tmp_path / "broken.jsonl").write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n}\n")
    match = match.replace("{tmp}", str(tmp_path))
    line = _one_line_error(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], match=match)
    assert line.startswith(f"entangle {argv[0]}: error: ")


def test_usage_errors_are_one_line(capsys):
    line = _one_line_error(capsys, ["gram", "--no-such-option"], code=2, match="unrecognized arguments")
    assert "--help" in line


@pytest.mark.parametrize("argv, match", [
    (["gram", "--beta", "-1"], "argument --beta: must be a positive number, got '-1'"),
    (["gram", "--beta", "0"], "argument --beta: must be a positive number, got '0'"),
    (["analyze", "run", "--data", "builtin", "--beta", "inf"], "argument --beta: must be a positive number"),
    (["demo", "--beta", "nan"], "argument --beta: must be a positive number, got 'nan'"),
    (["demo", "--beta", "high"], "argument --beta: must be a positive number, got 'high'"),
    (["gram", "--n-pairs", "0"], "argument --n-pairs: must be an integer of at least 1, got '0'"),
    (["gram", "--max-length", "1.5"], "argument --max-length: must be an integer of at least 1, got '1.5'"),
    (["analyze", "run", "--data", "builtin", "--max-pairs", "-3"], "argument --max-pairs: must be an integer of at"),
    (["demo", "--every", "0"], "argument --every: must be an integer of at least 1, got '0'"),
    (["demo", "--sft-steps", "-1"], "argument --sft-steps: must be an integer of at least 0, got '-1'"),
    (["gram", "--device", "gpu"], "argument --device: 'gpu' is not a device name (cpu, cuda, cuda:1, mps, ...)"),
    (["analyze", "run", "--data", "builtin", "--device", "meta"], "argument --device: META is not available"),
])
def test_bad_option_values_are_one_usage_line(capsys, argv, match):
    line = _one_line_error(capsys, argv, code=2, match=match)
    assert line.startswith(f"entangle {argv[0]}: error: ")


@pytest.mark.parametrize("command", [["gram"], ["analyze", "run", "--data", "builtin"]])
def test_cuda_on_a_machine_without_it_is_one_usage_line(capsys, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)      # any machine: this one has no CUDA
    why = f" (torch {torch.__version__} is a build without CUDA)" if torch.version.cuda is None else ""
    _one_line_error(capsys, [*command, "--device", "cuda"], code=2,
                    match=f"argument --device: CUDA is not available on this machine{why} (see entangle")


def test_a_cuda_device_the_machine_lacks_is_one_usage_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # any machine: this one has two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _one_line_error(capsys, ["gram", "--device", "cuda:2"], code=2,
                    match="argument --device: 'cuda:2': this machine has 2 CUDA device(s), numbered from 0")


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"entangle {entangle.__version__}\n"
    assert importlib.metadata.version("entangle") == entangle.__version__   # pyproject.toml agrees


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The hub at a closed local port (refused at once, on any machine) and an empty hub cache; returns the cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("argv, option", [
    (["gram", "--model", "notamodel"], "--model 'notamodel'"),
    (["demo", "--model", "someorg/notamodel", "--out", "{tmp}/d"], "--model 'someorg/notamodel'"),
    (["analyze", "{tmp}", "--data", "builtin", "--ref-model", "someorg/notamodel"], "--ref-model 'someorg/notamodel'"),
    (["analyze", "{tmp}", "--data", "builtin", "--tokenizer", "notatokenizer"], "--tokenizer 'notatokenizer'"),
])
def test_an_uncached_hub_name_fails_fast_when_the_hub_cannot_be_reached(unreachable_hub, tmp_path, capsys, argv,
                                                                         option):
    start = time.perf_counter()
    line = _one_line_error(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], match=(
        f"{option} is neither a local model directory nor a cached hub model, "
        "and the hub (http://127.0.0.1:9) cannot be reached"))
    assert time.perf_counter() - start < 10, "the hub was retried"
    assert line.startswith(f"entangle {argv[0]}: error: ")
    assert not (tmp_path / "d").exists()


def test_a_cached_hub_model_loads_from_its_snapshot_when_the_hub_cannot_be_reached(unreachable_hub, capsys):
    repo = unreachable_hub / "models--someorg--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    tokenizer = builtin_tokenizer()
    builtin_model(tokenizer).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert Path(pretrained_source("someorg/tiny", "--model")) == snapshot.resolve()
    assert main(["gram", "--model", "someorg/tiny", "--n-pairs", "2"]) == 0
    assert "2 pairs:" in capsys.readouterr().out


@pytest.mark.slow
def test_console_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "entangle.cli", "report", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr
