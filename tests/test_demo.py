"""`entangle demo` end to end, reduced in size; and at full size, that it really shows the pitfall."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from entangle.demo import DemoConfig, run_demo, summary_text
from entangle.runio import read_run


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_reduced_demo_writes_run_and_report(tmp_path, capsys):
    cfg = DemoConfig(out=str(tmp_path / "demo"), n_train=32, n_probe=8, sft_steps=10, dpo_steps=4, every=2,
                     batch_size=8)
    report = run_demo(cfg)
    assert report.name == "report.html" and report.exists()
    html = report.read_text()
    for name in ["logprob_dynamics", "gradient_statistics", "regime_plane", "regime_shares", "layer_breakdown",
                 "prediction_check", "shared_content"]:
        assert (report.parent / f"{name}.png").stat().st_size > 5000, name
        assert f'{name}' in html
    run = read_run(tmp_path / "demo" / "run")
    steps = sorted(run["pairs"]["step"].unique())
    assert steps == [0, 2, 4]
    assert len(run["pairs"]) == 8 * len(steps)
    assert set(run["covariates"]["kind"]) == {"last_token", "short_suffix", "long_suffix", "unrelated"}
    assert run["manifest"]["objective"]
    out = capsys.readouterr().out
    assert "report:" in out and "chosen log-prob fell for" in out
    with pytest.raises(ValueError, match="already holds a run"):
        run_demo(cfg)


@pytest.mark.slow
def test_full_demo_shows_the_pitfall_and_its_dependence_on_shared_content(tmp_path):
    """The built-in task, at its default size: chosen log-probs fall for pairs whose responses share a lot."""
    run_demo(DemoConfig(out=str(tmp_path / "demo")))
    run = read_run(tmp_path / "demo" / "run")
    pairs, cov = run["pairs"], run["covariates"]
    first, last = pairs[pairs.step == pairs.step.min()], pairs[pairs.step == pairs.step.max()]
    moved = (last.set_index("pair")["logp_chosen"] - first.set_index("pair")["logp_chosen"]).rename("d_chosen")
    by_kind = pd.concat([moved, pairs.groupby("pair")["cosine"].median()], axis=1).join(cov.set_index("pair")["kind"])
    fell = (by_kind["d_chosen"] < 0).groupby(by_kind["kind"]).mean()
    cos = by_kind.groupby("kind")["cosine"].median()
    assert fell[["last_token", "short_suffix"]].min() >= 0.75, fell    # the pitfall, for a clear share
    assert fell["unrelated"] <= 0.5, fell
    assert cos["last_token"] > cos["long_suffix"] > cos["unrelated"] + 0.2, cos
    assert "chosen log-prob fell" in summary_text(tmp_path / "demo" / "run")


@pytest.mark.slow
def test_demo_cli_runs(tmp_path, capsys):
    from entangle.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--n-train", "16", "--n-probe", "4", "--sft-steps", "2",
                 "--dpo-steps", "2", "--every", "1"]) == 0
    assert (tmp_path / "d" / "report" / "report.html").exists()
    assert "report:" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_report_has_token_maps_of_the_extreme_pairs(tmp_path):
    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), n_train=16, n_probe=4, sft_steps=2, dpo_steps=2,
                                 every=1, batch_size=4))
    run = read_run(tmp_path / "demo" / "run")
    tokens, pairs = run["tokens"], run["pairs"]
    last = pairs[pairs.step == pairs.step.max()].set_index("pair")["cosine"]
    assert set(tokens["step"]) == {pairs.step.max()}
    which = tokens.drop_duplicates("pair").set_index("which")["pair"].to_dict()
    assert which == {"most entangled": last.idxmax(), "least entangled": last.idxmin()}
    html = report.read_text()
    for name in ("token_heatmap_most_entangled", "token_heatmap_least_entangled", "ranking_accuracy"):
        assert (report.parent / f"{name}.png").stat().st_size > 5000, name
        assert f'id="fig-{name}"' in html
