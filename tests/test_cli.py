"""The ``entangle`` command line: gram and report end to end, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import _one_line_error

from entangle.cli import COMMANDS, main
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
    (["gram", "--data", "{tmp}/absent.jsonl"], "does not exist"),
    (["gram", "--model", "{tmp}/no-model"], "model directory"),
    (["gram", "--objective", "sft", "--beta", "0.1"], "has no beta"),
    (["gram", "--n-pairs", "0"], "--n-pairs must be at least 1"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    line = _one_line_error(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], match=match)
    assert line.startswith(f"entangle {argv[0]}: error: ")


def test_usage_errors_are_one_line(capsys):
    line = _one_line_error(capsys, ["gram", "--no-such-option"], code=2, match="unrecognized arguments")
    assert "--help" in line


@pytest.mark.slow
def test_console_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "entangle.cli", "report", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr
