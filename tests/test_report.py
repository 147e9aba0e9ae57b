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

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one thread


def write_run(out: Path, n_steps: int = 8, sgd_steps: int = 3) -> Path:
    """A real run: the built-in GPT-2, warmed up on the chosen responses, then DPO by plain SGD.

    Every ``sgd_steps`` steps it writes the pairs, summary and layer tables, and the first update after the
    measurement as the updates table (observed change vs the first-order predictions).
    """
    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
    from entangle.capture.logprobs import sequence_logps
    from entangle.capture.measure import sequence_gram, update_dot
    from entangle.data import encode_pairs
    from entangle.metrics.tables import layer_frame

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
    from entangle.metrics.covariates import pair_covariates

    covariates = pair_covariates(batch)
    covariates.insert(1, "kind", [r["kind"] for r in builtin_pairs(B)])
    writer.write("covariates", covariates.assign(step=0), 0)
    names = [n for n, _ in model.named_parameters()]
    pref = np.linspace(0.2, 0.95, B)      # per-pair preference probabilities: some pairs are near coin flips
    for k in range(n_steps):
        step = k * sgd_steps
        gram = sequence_gram(model, batch)
        frame = pair_frame(gram, "sigmoid", ref, step=step, lr=LR, beta=BETA, pref_prob=pref)
        writer.write("pairs", frame, step)
        writer.write("summary", summarize(frame, pref_col="pref_prob"), step)
        writer.write("layers", layer_frame(gram, step, range(B)), step)
        if k == n_steps - 1:   # token maps of the most and least entangled pairs, as Monitor.token_maps writes
            writer.write("tokens", token_maps_of(model, batch, tok, frame, step), step)
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


def token_maps_of(model, batch, tok, frame: pd.DataFrame, step: int) -> pd.DataFrame:
    from entangle.capture.tokens import token_map

    cos = frame.set_index("pair")["cosine"]
    picked = ((int(cos.idxmax()), "most entangled"), (int(cos.idxmin()), "least entangled"))
    return pd.concat([token_map(model, batch, pair=p, tokenizer=tok).assign(step=step, which=w, method="full")
                      for p, w in picked], ignore_index=True)


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


HEATMAPS = ("token_heatmap_most_entangled", "token_heatmap_least_entangled")


def n_images(heatmaps: int = len(HEATMAPS), skipped: int = 0) -> int:
    """Images of a report: one per figure, except the token maps (one per mapped pair) and the quiet ones (of
    training pairs, which these runs do not measure), less those skipped."""
    return sum(not spec.quiet for spec in FIGURES) - 1 + heatmaps - skipped


def test_every_figure_is_a_nonempty_png_and_embedded(report):
    names = [spec.name for spec in FIGURES if not spec.many and not spec.quiet] + list(HEATMAPS)
    for name in names:
        png = report.parent / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
        assert (report.parent / f"{name}.pdf").stat().st_size > 1_000
    assert report.name == "report.html"
    assert _parse(report).images == n_images()
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
            assert float(text) == pytest.approx(want, rel=5e-3, abs=1e-12), (column, text, want)
            if want and column not in ("step", "n_pairs", "n_excluded"):   # 3 significant digits, zeros kept
                assert len(text.lstrip("-0.").replace(".", "")) == 3, (column, text)
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
    for table in ("updates", "layers", "summary", "tokens", "covariates"):
        shutil.rmtree(partial / table)
    path = make_report(partial)
    assert path == partial / "report" / "report.html"
    text = path.read_text()
    assert "the run has no updates table" in text and "the run has no layers table" in text
    assert "the run has no tokens table" in text and "token_heatmap_" not in text
    assert "summary was computed from the pairs table" in text
    assert not (path.parent / "prediction_check.png").exists() and not (path.parent / "layer_breakdown.png").exists()
    assert (path.parent / "regime_shares.png").exists()
    cells = _parse(path)
    assert cells.images == n_images(heatmaps=0, skipped=3)
    assert not list(path.parent.glob("token_heatmap*"))
    expected = summarize(read_run(partial)["pairs"])
    assert [float(r["ratio_q50"][1]) for r in cells.rows if r] == expected["ratio_q50"].tolist()


@pytest.mark.slow
def test_report_of_a_monitor_run(tmp_path):
    """The tables the training monitor writes (here from a hand-written AdamW loop) make a full report."""
    from entangle.builtin import builtin_model, builtin_pairs, builtin_tokenizer
    from entangle.capture.logprobs import sequence_logps
    from entangle.data import encode_pairs
    from entangle.integrations.monitor import Monitor

    tok = builtin_tokenizer()
    model = builtin_model(tok, n_layer=1, n_embd=32)
    rows = [r | {"pref_prob": p} for r, p in zip(builtin_pairs(4), (0.9, 0.6, 0.3, 0.99), strict=True)]
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
    monitor.measure(3)
    monitor.token_maps()
    path = make_report(tmp_path / "run")
    assert _parse(path).images == n_images(skipped=1)      # no covariates table: no shared-content figure
    assert "the run has no covariates table" in path.read_text()
    rows = [r for r in _parse(path).rows if r]
    assert [float(r["step"][1]) for r in rows] == [0, 1, 2, 3]
    assert all("idealized_ranking_accuracy" in r and "ranking_accuracy_gap" in r for r in rows)
    for name in HEATMAPS + ("ranking_accuracy",):
        assert (path.parent / f"{name}.png").stat().st_size > 10_000, name


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_report(tmp_path / "nope")
    (tmp_path / "empty" / "updates").mkdir(parents=True)
    with pytest.raises(ValueError, match="no pairs or summary table"):
        make_report(tmp_path / "empty")


def test_token_heatmaps_and_ranking_accuracy_in_the_report(report, run_dir):
    from entangle.report.figures import ranking_accuracy
    from entangle.report.tokens import pair_cosine, token_heatmaps

    run = read_run(run_dir)
    tokens, pairs, summary = run["tokens"], run["pairs"], run["summary"]
    text = report.read_text()
    for name, label in zip(HEATMAPS, ("most entangled", "least entangled"), strict=True):
        assert f'id="fig-{name}"' in text and f"Token maps: {label}</h3>" in text
    assert 'id="fig-ranking_accuracy"' in text and "idealized" in text
    # the heatmaps: most entangled first, titled with the pair's cosine, which the tokens' blocks reproduce
    last = pairs[pairs["step"] == pairs["step"].max()].set_index("pair")
    drawn = token_heatmaps(tokens)
    assert [(suffix, label) for suffix, label, _ in drawn] == [("most_entangled", "most entangled"),
                                                               ("least_entangled", "least entangled")]
    for (_, label, fig), pair in zip(drawn, (last["cosine"].idxmax(), last["cosine"].idxmin()), strict=True):
        assert pair_cosine(tokens, pair) == pytest.approx(last.loc[pair, "cosine"], rel=1e-6)
        title = fig._suptitle.get_text()
        assert title.startswith(f"{label} (step {pairs['step'].max()}): pair {pair}")
        assert f"cos(g_w, g_l) = {last.loc[pair, 'cosine']:.2f}" in title
    # ranking accuracy: four series and the gap panel with the preference column, one panel without
    fig = ranking_accuracy(summary)
    assert len(fig.axes) == 2 and len(fig.axes[0].get_lines()) == 5     # 4 series + the 50% line
    assert "idealized" in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    bars = [p.get_height() for p in fig.axes[1].patches]
    np.testing.assert_allclose(bars, 100 * summary.sort_values("step")["ranking_accuracy_gap"])
    plain = ranking_accuracy(summary.drop(columns=["idealized_ranking_accuracy", "ranking_accuracy_gap"]))
    assert len(plain.axes) == 1 and len(plain.axes[0].get_lines()) == 4


def test_token_heatmap_of_long_responses_is_capped():
    from entangle.report.tokens import token_heatmaps

    t, u = np.meshgrid(np.arange(90), np.arange(130), indexing="ij")
    frame = pd.DataFrame({"step": 7, "pair": 2, "block": "wl", "t": t.ravel(), "u": u.ravel(),
                          "token_w": [f" w{i}" for i in t.ravel()], "token_u": [f"u{j}" for j in u.ravel()],
                          "inner": 0.01, "cosine": np.cos(t.ravel() - u.ravel())})
    (suffix, label, fig), = token_heatmaps(frame)
    assert (suffix, label) == ("pair2", "pair 2")
    ax = fig.axes[0]
    assert len(ax.get_xticklabels()) == 60 and len(ax.get_yticklabels()) == 60
    assert "first 60 × 60 of 90 × 130 tokens" in fig._suptitle.get_text()
    w, h = fig.get_size_inches()
    assert w <= 20 and h <= 20


def test_title_names_the_objective_and_the_model(report):
    from entangle.report.html import report_title

    assert "<h1>DPO (sigmoid, β=0.1) on builtin — entanglement report</h1>" in report.read_text(encoding="utf-8")
    assert report_title({}, "/somewhere/run") == "Entanglement report: run"
    assert report_title({"objective": "ipo", "hyper": {"beta": 0.5}, "model": "/m/tiny-llama"}, "run") == \
        "IPO (ipo, β=0.5) on tiny-llama — entanglement report"
    assert report_title({"model": "/m/tiny-llama", "train_pairs": {"every": 1}}, "run") == \
        "tiny-llama — entanglement report"                     # an in-pass run: no objective


def test_sign_agreement_in_the_figure_is_the_one_definition(run_dir):
    from entangle.metrics.agreement import sign_agreement
    from entangle.report.figures import prediction_check
    from entangle.report.figures import sign_agreement as per_step

    updates = read_run(run_dir)["updates"]
    got = per_step(updates)
    assert len(got) == 2 * updates["step"].nunique()
    for _, row in got.iterrows():
        u = updates[(updates["step"] == row["step"]) & (updates["side"] == row["side"])]
        assert row["agreement"] == sign_agreement(u["observed"], u["pred_update"], u["logp_before"])
    fig = prediction_check(updates)
    for line, side in zip(fig.axes[1].get_lines(), ("chosen", "rejected"), strict=False):
        np.testing.assert_allclose(line.get_ydata(), 100 * got[got["side"] == side]["agreement"])


def test_logprob_dynamics_by_pair_group_equals_the_group_table(report, run_dir):
    from entangle.report.figures import group_dynamics, logprob_dynamics
    from entangle.report.html import group_table

    run = read_run(run_dir)
    pairs, cov = run["pairs"], run["covariates"]
    groups = group_table(pairs, cov)
    kinds = list(dict.fromkeys(cov["kind"]))
    assert groups["group"].tolist() == kinds and groups["n"].sum() == N_PAIRS
    fig = logprob_dynamics(pairs, cov)
    last = pairs["step"].max()
    for ax, column in zip(fig.axes[:3], ("chosen", "rejected", "margin"), strict=True):
        lines = {line.get_label().rsplit(" (", 1)[0]: line for line in ax.get_lines() if "(" in line.get_label()}
        assert list(lines) == kinds
        for kind, line in lines.items():
            x, y = line.get_xdata(), line.get_ydata()
            assert x[-1] == last and y[-1] == pytest.approx(groups.set_index("group").loc[kind, column])
    # by hand for one group: the mean change of its pairs' chosen log-probs since the first step
    kind = kinds[0]
    members = cov.loc[cov["kind"] == kind, "pair"]
    p = pairs[pairs["pair"].isin(members)].set_index(["step", "pair"])["logp_chosen"]
    assert groups.loc[0, "chosen"] == pytest.approx((p.loc[last] - p.loc[pairs["step"].min()]).mean())
    assert group_dynamics(pairs) is None                     # no group without the covariates
    text = report.read_text(encoding="utf-8")
    assert 'id="groups"' in text and all(f">{k}<" in text for k in kinds)


def test_reference_ranking_line_is_drawn_above_the_policy(run_dir):
    from entangle.report.figures import ranking_accuracy

    fig = ranking_accuracy(read_run(run_dir)["summary"])
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    reference = lines["reference model"]
    policy = next(line for label, line in lines.items() if label.startswith("policy:"))
    assert reference.get_zorder() > policy.get_zorder() and reference.get_linestyle() != "-"
