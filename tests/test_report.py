"""Report: figures, verdicts and the HTML page, on a real run directory written in the test."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from entangle.capture.result import GramResult
from entangle.metrics import pair_frame, summarize
from entangle.report import FIGURES, make_report, plane_regime, verdicts
from entangle.report.figures import (
    chosen_falls_boundary,
    coefficient_ratio,
    layer_shares,
    regime_plane,
    rejected_rises_boundary,
)
from entangle.report.verdict import layer_phrase, step_ranges, verdict_for
from entangle.runio import RunWriter, read_run

N_PAIRS, LR, BETA = 12, 0.3, 0.1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; with more, a loaded machine's spinning OpenMP workers slow them ~100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_run(out: Path, n_steps: int = 8, sgd_steps: int = 3) -> Path:
    """A real run: the built-in GPT-2, warmed up on the chosen responses, then DPO by plain SGD.

    Every ``sgd_steps`` steps it writes the pairs, summary and layer tables, and the first update after the
    measurement as the updates table (observed change vs the first-order predictions).
    """
    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
    from entangle.capture.engine import sequence_gram, update_dot
    from entangle.capture.logprobs import sequence_logps
    from entangle.data import encode_pairs
    from entangle.integrations.monitor import layer_frame

    tok = builtin_tokenizer()
    model = builtin_model(tok, n_layer=2, n_embd=32)
    B = N_PAIRS
    batch = encode_pairs(tok, builtin_pairs(B))
    warm = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):  # supervised warm-up on the chosen responses: chosen likely, rejected not
        loss = -sequence_logps(model, batch)[:B].mean()
        warm.zero_grad()
        loss.backward()
        warm.step()
    ref = sequence_logps(model, batch).detach().double()
    writer = RunWriter(out)
    writer.write_manifest({"objective": "sigmoid", "beta": BETA, "model": "builtin", "lr": LR})
    names = [n for n, _ in model.named_parameters()]
    for k in range(n_steps):
        step = k * sgd_steps
        gram = sequence_gram(model, batch)
        frame = pair_frame(gram, "sigmoid", ref, step=step, lr=LR, beta=BETA)
        writer.write("pairs", frame, step)
        writer.write("summary", summarize(frame), step)
        writer.write("layers", layer_frame(gram, step, range(B)), step)
        for j in range(sgd_steps):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            logps = sequence_logps(model, batch)
            margin = BETA * ((logps[:B] - ref[:B]) - (logps[B:] - ref[B:]))
            loss = -torch.nn.functional.logsigmoid(margin).mean()
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR * p.grad
            model.zero_grad()
            if j == 0:
                params = dict(model.named_parameters())
                delta = {n: params[n].detach() - before[n] for n in names}
                pred = update_dot_at(model, batch, delta, before, update_dot)
                after = sequence_logps(model, batch).detach().double()
                observed = after - gram.logps
                writer.write("updates", pd.DataFrame({
                    "step": step, "seq": np.arange(2 * B), "pair": np.arange(2 * B) % B,
                    "side": ["chosen"] * B + ["rejected"] * B,
                    "logp_before": gram.logps.numpy(), "logp_after": after.numpy(), "observed": observed.numpy(),
                    "pred_update": pred.numpy(),
                    "pred_gradient": np.concatenate([frame["batch_dlogp_chosen"], frame["batch_dlogp_rejected"]]),
                }), step)
    return out


def update_dot_at(model, batch, delta, before, update_dot) -> torch.Tensor:
    """<g_i, delta> with the gradients taken at the parameters ``before`` the update."""
    with torch.no_grad():
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.copy_(before[n])
    pred, _ = update_dot(model, batch, delta)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(after[n])
    return pred


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory) -> Path:
    return make_report(run_dir, tmp_path_factory.mktemp("report"), formats=("png", "pdf"))


class _Cells(HTMLParser):
    """Collects the summary table's cells and the verdict items of the report page."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict[str, tuple[str, str]]] = []
        self.verdicts: list[str] = []
        self.images = 0
        self._cell: tuple[str, str] | None = None
        self._in_summary = self._in_verdict = False
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "summary":
            self._in_summary = True
        elif tag == "tr" and self._in_summary:
            self.rows.append({})
        elif tag == "td" and self._in_summary:
            self._cell, self._text = (a["data-column"], a["data-value"]), ""
        elif tag == "li" and "data-start" in a:
            self._in_verdict, self._text = True, ""
        elif tag == "img" and a.get("src", "").startswith("data:image/png;base64,"):
            self.images += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_summary = False
        elif tag == "td" and self._cell:
            self.rows[-1][self._cell[0]] = (self._text, self._cell[1])
            self._cell = None
        elif tag == "li" and self._in_verdict:
            self.verdicts.append(self._text)
            self._in_verdict = False

    def handle_data(self, data):
        self._text += data


def _parse(path: Path) -> _Cells:
    cells = _Cells()
    cells.feed(path.read_text(encoding="utf-8"))
    return cells


def test_run_has_both_regimes(run_dir):
    regimes = set(read_run(run_dir)["pairs"]["regime"].dropna())
    assert "ideal" in regimes and regimes & {"both_fall", "both_rise"}


def test_every_figure_is_a_nonempty_png_and_embedded(report):
    for spec in FIGURES:
        png = report.parent / f"{spec.name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, spec.name
        assert (report.parent / f"{spec.name}.pdf").stat().st_size > 1_000
    assert report.name == "report.html"
    assert _parse(report).images == len(FIGURES)
    assert "<link" not in report.read_text() and "<script" not in report.read_text()  # self-contained


def test_html_summary_numbers_equal_the_summary_table(report, run_dir):
    summary = read_run(run_dir)["summary"].sort_values("step").reset_index(drop=True)
    rows = [r for r in _parse(report).rows if r]
    assert len(rows) == len(summary)
    checked = set()
    for row, (_, expected) in zip(rows, summary.iterrows(), strict=True):
        for column, (text, exact) in row.items():
            want = float(expected[column])
            checked.add(column)
            if np.isnan(want):
                assert exact == "nan" and text == "–"
                continue
            assert float(exact) == want, (column, exact, want)
            assert float(text) == pytest.approx(want, rel=5e-4, abs=1e-12), (column, text, want)
    assert {"step", "n_pairs", "share_ideal", "share_both_fall", "cosine_q50", "ratio_q50",
            "ranking_accuracy"} <= checked


def test_html_verdicts_are_those_of_the_tables(report, run_dir):
    run = read_run(run_dir)
    expected = [v.text for v in verdicts(run["pairs"], run["layers"], run["updates"])]
    assert _parse(report).verdicts == expected
    assert expected and all(t.startswith("step") for t in expected)


def test_verdict_numbers_on_a_constructed_frame():
    rows = []
    for step in (0, 10):      # all ideal, ratio 0.5
        rows += [{"step": step, "pair": k, "regime": "ideal", "ratio": 0.5} for k in range(4)]
    for step in (20, 30):     # 3 of 4 pairs both fall (ratios 2, 3, 4), one ideal
        rows += [{"step": step, "pair": k, "regime": "both_fall", "ratio": 2.0 + k} for k in range(3)]
        rows.append({"step": step, "pair": 3, "regime": "ideal", "ratio": 0.1})
    rows.append({"step": 30, "pair": 4, "regime": "both_rise", "ratio": 9.0})
    pairs = pd.DataFrame(rows)
    # per pair: layers 10 and 11 carry 30% of the inner product each, layer 12 and the embedding 20% each
    layers = pd.DataFrame([{"step": s, "pair": k, "layer": name, "inner": w}
                           for s in (20, 30) for k in range(5)
                           for name, w in (("layer 10", 3.0), ("layer 11", 3.0), ("layer 12", 2.0), ("embed", 2.0))])
    updates = pd.DataFrame({"step": [20, 20, 30, 30], "side": ["chosen", "rejected", "chosen", "rejected"],
                            "observed": [-1.0, -2.0, 0.5, 0.3]})
    assert step_ranges(pairs) == [[0, 10], [20, 30]]
    first, second = verdicts(pairs, layers, updates)
    assert first.dominant == "ideal" and first.chosen_falls == 0 and first.median_ratio == 0.5
    assert first.ratio_of == "all" and "every probe pair" in first.text
    assert second.dominant == "both_fall" and second.n_rows == 9
    assert second.shares["both_fall"] == pytest.approx(6 / 9) and second.shares["both_rise"] == pytest.approx(1 / 9)
    assert second.chosen_falls == pytest.approx(6 / 9) and second.rejected_rises == pytest.approx(1 / 9)
    assert second.median_ratio == 3.0 and second.ratio_of == "affected"   # median of 2,3,4,2,3,4,9
    assert second.layers == ["layer 10", "layer 11"] and second.layer_share == pytest.approx(0.6)
    assert second.observed_chosen_falls == 0.5 and second.observed_rejected_rises == 0.5
    assert second.text.startswith("steps 20–30 (mostly both fall, 67%): chosen log-prob falls for 67% of probe pairs")
    assert "median entanglement ratio is 3.00" in second.text and "layers 10–11 (60%)" in second.text
    assert verdict_for(pairs, [0]).text.startswith("step 0 ")
    assert step_ranges(pairs, chunks=4) == [[0], [10], [20], [30]]


def test_layer_phrase_and_shares():
    assert layer_phrase(["head", "layer 11", "layer 10", "layer 12", "embed"]) == \
        "the embedding, layers 10–12 and the head"
    assert layer_phrase(["layer 3", "layer 1"]) == "layers 1, 3"
    layers = pd.DataFrame({"step": [0, 0, 0, 1, 1], "pair": 0, "layer": ["head", "layer 1", "embed", "head", "embed"],
                           "inner": [1.0, 2.0, 1.0, -1.0, 3.0]})
    share = layer_shares(layers)
    assert list(share.index) == ["embed", "layer 1", "head"]
    assert share[0].tolist() == [0.25, 0.5, 0.25] and share[1].dropna().tolist() == [1.5, -0.5]


def _random_gram(B: int, seed: int) -> GramResult:
    """Gradients with a spread of cosines and norm ratios, so that every per-pair regime occurs."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    base = torch.randn(B, d, generator=g, dtype=torch.float64)
    mix = torch.rand(B, 1, generator=g, dtype=torch.float64) * 2 - 0.5
    other = mix * base + torch.randn(B, d, generator=g, dtype=torch.float64) * (1 - mix.abs()).clamp(min=0.05)
    scale = 10 ** (torch.rand(B, 1, generator=g, dtype=torch.float64) * 1.6 - 0.8)
    V = torch.cat([base, other * scale])
    lengths = torch.randint(2, 20, (2 * B,), generator=g)
    return GramResult(matrix=V @ V.T, logps=-torch.rand(2 * B, generator=g, dtype=torch.float64) * 30, lengths=lengths)


@pytest.mark.parametrize("objective", ["sigmoid", "simpo"])
def test_regime_plane_boundaries_match_the_pair_frame(objective):
    gram = _random_gram(400, seed=3)
    ref = gram.logps + torch.randn(800, dtype=torch.float64)
    frame = pair_frame(gram, objective, ref if objective == "sigmoid" else None)
    r = coefficient_ratio(frame)
    assert r.notna().all()
    if objective == "sigmoid":
        assert np.allclose(r, 1.0)
    else:  # SimPO: r = |y_l| / |y_w|
        assert np.allclose(r, frame["len_rejected"] / frame["len_chosen"])
    y = 0.5 * np.log10(frame["norm2_chosen"] / frame["norm2_rejected"])
    got = plane_regime(frame["cosine"], y, r)
    assert {"ideal", "both_rise", "both_fall"} <= set(frame["regime"])
    assert (got == frame["regime"].to_numpy()).all()
    fig = regime_plane(frame)
    title = fig.axes[0].get_title()
    assert ("median r" in title) == (objective == "simpo")


def test_boundary_functions_follow_theory():
    cos = np.array([-0.5, 0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(chosen_falls_boundary(cos), [np.nan, np.nan, np.log10(0.25), np.log10(0.5), 0.0])
    np.testing.assert_allclose(rejected_rises_boundary(cos, r=2.0),
                               [np.nan, np.nan, -np.log10(0.5), 0.0, -np.log10(2.0)])
    # DPO: chosen falls iff cos > |g_w|/|g_l|; at cos = 0.5 the boundary is |g_w|/|g_l| = 0.5
    assert plane_regime([0.5], [np.log10(0.49)])[0] == "both_fall"
    assert plane_regime([0.5], [np.log10(0.51)])[0] == "ideal"
    assert plane_regime([0.5], [np.log10(2.01)])[0] == "both_rise"
    assert plane_regime([-0.9], [3.0])[0] == "ideal"


def test_report_with_missing_tables(run_dir, tmp_path):
    partial = tmp_path / "checkpoints"
    shutil.copytree(run_dir, partial)
    for table in ("updates", "layers", "summary"):
        shutil.rmtree(partial / table)
    path = make_report(partial)
    assert path == partial / "report" / "report.html"
    text = path.read_text()
    assert "the run has no updates table" in text and "the run has no layers table" in text
    assert "summary was computed from the pairs table" in text
    assert not (path.parent / "prediction_check.png").exists() and not (path.parent / "layer_breakdown.png").exists()
    assert (path.parent / "regime_shares.png").exists()
    cells = _parse(path)
    assert cells.images == len(FIGURES) - 2
    expected = summarize(read_run(partial)["pairs"])
    assert [float(r["ratio_q50"][1]) for r in cells.rows if r] == expected["ratio_q50"].tolist()


def test_report_of_a_monitor_run(tmp_path):
    """The tables the training monitor writes (here from a hand-written AdamW loop) make a full report."""
    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
    from entangle.capture.logprobs import sequence_logps
    from entangle.data import encode_pairs
    from entangle.integrations.monitor import Monitor

    tok = builtin_tokenizer()
    model = builtin_model(tok, n_layer=1, n_embd=32)
    rows = builtin_pairs(4)
    batch = encode_pairs(tok, rows)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = Monitor(model, tok, rows, "sigmoid", out_dir=tmp_path / "run", ref_logps="initial", beta=BETA)
    ref = sequence_logps(model, batch).detach()
    for step in range(3):
        logps = sequence_logps(model, batch)
        margin = BETA * ((logps[:4] - ref[:4]) - (logps[4:] - ref[4:]))
        (-torch.nn.functional.logsigmoid(margin).mean()).backward()
        monitor.measure(step, optimizer=opt)
        monitor.before_update(step)
        opt.step()
        monitor.after_update(step, optimizer=opt)
        opt.zero_grad()
    path = make_report(tmp_path / "run")
    assert _parse(path).images == len(FIGURES)
    assert [float(r["step"][1]) for r in _parse(path).rows if r] == [0, 1, 2]


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_report(tmp_path / "nope")
    (tmp_path / "empty" / "updates").mkdir(parents=True)
    with pytest.raises(ValueError, match="no pairs or summary table"):
        make_report(tmp_path / "empty")
