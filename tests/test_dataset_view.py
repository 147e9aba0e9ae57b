"""The dataset view of the training pairs (train_pairs, measured inside the trainer's own pass): per dataset row
numbers, the report's dataset figure and table, and ``entangle filter`` end to end on real HH-RLHF rows."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import _one_line_error

from entangle.cli import main
from entangle.data import load_pairs
from entangle.metrics.dataset import VIEW_COLUMNS, dataset_view, most_entangled, pair_texts
from entangle.report.figures import FIGURES, REGIME_LABELS, dataset_entanglement
from entangle.report.html import MOST_ENTANGLED, TEXT_CHARS, draw_figures, make_report
from entangle.runio import RunWriter, read_table
from entangle.schema import REGIMES, TRAIN_PAIR_DTYPES, validate

# the signs each regime has (THEORY.md §3): (chosen rises, rejected falls)
SIGNS = {"ideal": (True, True), "both_rise": (True, False), "both_fall": (False, True),
         "chosen_falls_rejected_rises": (False, False)}


def train_pairs(rows: list[dict]) -> pd.DataFrame:
    """A ``train_pairs`` frame from (step, index, cosine, ratio, regime[, rank, micro, pair, excluded]) rows; the
    other columns are plausible values, NaN where the pair is excluded; checked against the schema."""
    out = []
    for i, r in enumerate(rows):
        excluded = r.get("excluded", False)
        chosen_rises, rejected_falls = SIGNS[r.get("regime", "ideal")]
        measured = {"norm2_chosen": 2.0, "norm2_rejected": 3.0, "inner": 1.5, "cosine": r["cosine"],
                    "ratio": r["ratio"], "pred_dlogp_chosen": 0.1, "pred_dlogp_rejected": -0.1}
        out.append({"step": r["step"], "rank": r.get("rank", 0), "micro": r.get("micro", 0),
                    "pair": r.get("pair", i), "index": r["index"], "logp_chosen": -20.0 - i,
                    "logp_rejected": -21.0 - i, "len_chosen": 5 + i, "len_rejected": 6 + i,
                    **{k: np.nan if excluded else v for k, v in measured.items()},
                    "a_chosen": 0.0 if excluded else 0.05, "a_rejected": 0.0 if excluded else -0.05,
                    "chosen_rises": chosen_rises, "rejected_falls": rejected_falls,
                    "regime": r.get("regime", "ideal"), "margin": 1.0, "excluded": excluded})
    frame = pd.DataFrame(out)
    assert set(TRAIN_PAIR_DTYPES) <= set(frame.columns)
    validate("train_pairs", frame)
    return frame


def synthetic_run(n_rows: int, steps: int = 3, seed: int = 0) -> pd.DataFrame:
    """Every dataset row measured once per step, cosines spread over [-0.5, 1) and regimes by cosine band (rows
    whose index is a multiple of 7 excluded at step 0, row n_rows - 1 never measured), in 2 micro-batches."""
    g = np.random.default_rng(seed)
    rows = []
    for step in range(steps):
        for index in range(n_rows):
            cos = float(np.clip(-0.5 + 1.5 * index / n_rows + g.normal(0, 0.05), -1, 0.999))
            regime = "ideal" if cos < 0.5 else ("both_fall" if index % 2 else "both_rise")
            rows.append({"step": 10 * step, "micro": index % 2, "pair": index // 2, "index": index, "cosine": cos,
                         "ratio": 2 * cos, "regime": regime,
                         "excluded": (step == 0 and index % 7 == 0) or index == n_rows - 1})
    return train_pairs(rows)


def test_view_numbers_per_dataset_row():
    frame = train_pairs([
        {"step": 0, "index": 4, "cosine": 0.2, "ratio": 0.3, "regime": "ideal"},
        {"step": 5, "index": 4, "cosine": 0.4, "ratio": 0.5, "regime": "ideal"},
        {"step": 10, "index": 4, "cosine": 0.9, "ratio": 1.4, "regime": "both_fall"},
        {"step": 0, "index": 1, "cosine": 0.6, "ratio": 1.1, "regime": "both_rise"},
        {"step": 5, "index": 1, "cosine": 0.0, "ratio": 0.0, "excluded": True},
        {"step": 5, "index": 2, "cosine": 0.0, "ratio": 0.0, "excluded": True},
        {"step": 5, "index": -1, "cosine": 0.99, "ratio": 3.0, "regime": "both_fall"},        # unknown row: left out
        # one row seen by two ranks at the same step (a sampler padding the last batch): the latest is the last
        # in (rank, micro, pair) order, the mean counts both
        {"step": 10, "rank": 1, "micro": 0, "pair": 0, "index": 7, "cosine": -0.2, "ratio": -0.3},
        {"step": 10, "rank": 0, "micro": 1, "pair": 3, "index": 7, "cosine": 0.5, "ratio": 0.8, "regime": "both_rise"},
    ])
    view = dataset_view(frame)
    assert list(view.columns) == list(VIEW_COLUMNS)
    expected = pd.DataFrame({
        "index": [1, 2, 4, 7], "n_measured": [1, 0, 3, 2], "n_excluded": [1, 1, 0, 0],
        "step_latest": pd.array([0, None, 10, 10], dtype="Int64"),
        "cosine_latest": [0.6, np.nan, 0.9, -0.2], "cosine_mean": [0.6, np.nan, 0.5, 0.15],
        "ratio_mean": [1.1, np.nan, 2.2 / 3, 0.25],
        "share_ideal": [0.0, np.nan, 2 / 3, 0.5], "share_both_rise": [1.0, np.nan, 0.0, 0.5],
        "share_both_fall": [0.0, np.nan, 1 / 3, 0.0], "share_chosen_falls_rejected_rises": [0.0, np.nan, 0.0, 0.0],
        "regime_latest": pd.Series(["both_rise", None, "both_fall", "ideal"], dtype=object),
    })
    pd.testing.assert_frame_equal(view, expected, check_exact=False, rtol=1e-12)
    shares = view[[f"share_{r}" for r in REGIMES]].dropna()
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)

    assert most_entangled(view, 2)["index"].tolist() == [1, 4]                # NaN (row 2) never ranked
    assert most_entangled(view, 10, by="cosine_latest")["index"].tolist() == [4, 1, 7]
    assert most_entangled(view, 10, by="ratio_mean")["index"].tolist() == [1, 4, 7]
    tied = view.assign(cosine_mean=[0.5, np.nan, 0.5, 0.5])                   # ties: the lower index first
    assert most_entangled(tied, 3)["index"].tolist() == [1, 4, 7]
    with pytest.raises(ValueError, match="cannot rank dataset rows by 'share_ideal': the scores are cosine_mean"):
        most_entangled(view, 3, by="share_ideal")
    with pytest.raises(ValueError, match="k must be a positive integer, not 0"):
        most_entangled(view, 0)
    with pytest.raises(ValueError, match=r"table 'train_pairs' lacks required column\(s\) \['excluded'\]"):
        dataset_view(frame.drop(columns="excluded"))
    assert dataset_view(frame[frame["index"] < 0]).columns.tolist() == list(VIEW_COLUMNS)


def test_pair_texts_of_standard_and_conversational_rows():
    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "extra": 1},
            {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "assistant", "content": "Go away"}]}]
    texts = pair_texts(rows)
    assert texts.to_dict("list") == {"index": [0, 1], "prompt": ["The sky is", "user: Hi"],
                                     "chosen": [" blue.", "assistant: Hello"],
                                     "rejected": [" green.", "assistant: Go away"]}
    validate("pairs_text", texts)


class _EntangledRows(HTMLParser):
    """The cells of the report's most-entangled table: one dict per row, column -> (shown text, data-value)."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict[str, tuple[str, str | None]]] = []
        self._inside = False
        self._cell: tuple[str, str | None] | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._inside = a.get("id") == "most-entangled"
        elif tag == "tr" and self._inside:
            self.rows.append({})
        elif tag == "td" and self._inside:
            self._cell, self._text = (a["data-column"], a.get("data-value")), ""

    def handle_endtag(self, tag):
        if tag == "td" and self._cell:
            self.rows[-1][self._cell[0]] = (self._text, self._cell[1])
            self._cell = None
        elif tag == "table":
            self._inside = False

    def handle_data(self, data):
        self._text += data


def _entangled_rows(path: Path) -> list[dict]:
    parser = _EntangledRows()
    parser.feed(path.read_text(encoding="utf-8"))
    return [r for r in parser.rows if r]


@pytest.fixture(scope="module")
def hh_file(hh_rows, tmp_path_factory) -> Path:
    """The first 40 raw HH-RLHF rows as a JSONL file (no prompt field: load_pairs splits the dialogues)."""
    path = tmp_path_factory.mktemp("data") / "hh40.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_rows[:40]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with only a train_pairs table, 36 of the 40 dataset rows, written in parts per step."""
    run = tmp_path_factory.mktemp("run") / "run"
    frame = synthetic_run(36)
    writer = RunWriter(run)
    for step, part in frame.groupby("step"):
        writer.write("train_pairs", part, step=int(step))
    writer.write_manifest({"objective": "sigmoid", "model": "tiny"})
    return run


def test_dataset_figure_draws_the_views_numbers():
    frame = synthetic_run(36)
    view = dataset_view(frame)
    fig = dataset_entanglement(frame)
    ax, bx = fig.axes[:2]
    measured = view[view["n_measured"] > 0]
    for container, label in zip(ax.containers, fig.legends[0].get_texts(), strict=True):
        regime = {REGIME_LABELS[r]: r for r in REGIMES}[label.get_text().rsplit(" (", 1)[0]]
        heights = [bar.get_height() for bar in container]
        counts, _ = np.histogram(measured.loc[measured["regime_latest"] == regime, "cosine_mean"],
                                 np.linspace(-1, 1, 41))
        assert heights == counts.tolist(), regime
    assert sum(sum(b.get_height() for b in c) for c in ax.containers) == len(measured) == 35
    ranked = bx.lines[0].get_ydata()
    np.testing.assert_array_equal(ranked, np.sort(measured["cosine_mean"].to_numpy())[::-1])


def test_report_of_a_training_run_has_the_figure_and_the_most_entangled_pairs(run_dir, hh_file, tmp_path, capsys):
    view = dataset_view(read_table(run_dir, "train_pairs"))
    top = most_entangled(view, MOST_ENTANGLED)
    assert main(["report", str(run_dir), "--out", str(tmp_path / "with-text"), "--data", str(hh_file)]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert (path.parent / "dataset_entanglement.png").stat().st_size > 10_000
    page = path.read_text(encoding="utf-8")
    assert 'id="fig-dataset_entanglement"' in page and "the run has no pairs table" in page
    rows = _entangled_rows(path)
    assert [int(r["index"][1]) for r in rows] == top["index"].tolist()
    assert [float(r["cosine_mean"][1]) for r in rows] == top["cosine_mean"].tolist()
    assert [r["regime_latest"][0] for r in rows] == top["regime_latest"].tolist()
    loaded = load_pairs(hh_file)
    for r in rows:
        chosen = " ".join(loaded[int(r["index"][1])]["chosen"].split())
        shown = r["chosen"][0]
        assert shown == chosen if len(chosen) <= TEXT_CHARS else shown == chosen[:TEXT_CHARS - 1] + "…"

    # without the text: the same rows, and a note saying how to get it
    plain = make_report(run_dir, tmp_path / "plain")
    assert [r["index"] for r in _entangled_rows(plain)] == [r["index"] for r in rows]
    assert "No text: pass the training dataset" in plain.read_text(encoding="utf-8")
    assert "chosen" not in _entangled_rows(plain)[0]

    # a text table shorter than the rows the run measured is the wrong dataset
    with pytest.raises(ValueError, match="the text of the training pairs has 20 row.*measured dataset row 35"):
        make_report(run_dir, tmp_path / "short", texts=pair_texts(loaded[:20]))


def test_a_run_without_training_pairs_has_no_dataset_figure(tmp_path):
    drawn = draw_figures({}, tmp_path)          # no table at all: every other figure is noted as skipped
    assert [d.spec.name for d in drawn] == [f.name for f in FIGURES if f.name != "dataset_entanglement"]
    RunWriter(tmp_path / "mine").write("mine", pd.DataFrame({"x": [1]}), step=0)
    with pytest.raises(ValueError, match="no pairs or summary table .*, nor train_pairs"):
        make_report(tmp_path / "mine")


def test_filter_drops_the_most_entangled_measured_rows(run_dir, hh_file, tmp_path, capsys):
    out = tmp_path / "kept.jsonl"
    assert main(["filter", str(run_dir), "--data", str(hh_file), "--out", str(out), "--drop-top", "0.2"]) == 0
    printed = capsys.readouterr().out
    view = dataset_view(synthetic_run(36))
    ranked = most_entangled(view, 40)
    assert len(ranked) == 35                                    # row 35 never measured, rows 36-39 not reached
    dropped = ranked["index"].head(7).tolist()                  # floor(0.2 * 35) = 7
    assert "40 rows in" in printed and "35 measured, 5 never measured (kept)" in printed
    assert f"dropped 7 of the 35 measured rows (mean cosine >= {ranked['cosine_mean'].iloc[6]:.3f})" in printed
    assert "wrote 33 rows" in printed
    loaded = load_pairs(hh_file)
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert kept == [row for i, row in enumerate(loaded) if i not in dropped]
    assert set(kept[0]) == {"prompt", "chosen", "rejected"} and load_pairs(out) == kept     # TRL-ready

    weighted = tmp_path / "weighted.parquet"
    assert main(["filter", str(run_dir), "--data", str(hh_file), "--out", str(weighted), "--weight"]) == 0
    assert "wrote 40 rows" in capsys.readouterr().out
    frame = pd.read_parquet(weighted)
    score = view.set_index("index")["cosine_mean"].reindex(range(40))
    expected = np.where(score.notna(), 1 - score.clip(lower=0), 1.0)
    np.testing.assert_array_equal(frame["weight"].to_numpy(), expected)
    assert frame[["prompt", "chosen", "rejected"]].to_dict("records") == loaded
    assert (frame["weight"] < 1).sum() == (score > 0).sum() > 10


@pytest.mark.parametrize(("argv", "code", "match"), [
    ("{run} --data {data} --out {out} --drop-top 0", 2,
     "argument --drop-top: must be a fraction above 0 and at most 1, got '0'"),
    ("{run} --data {data} --out {out} --drop-top 1.5", 2, "must be a fraction above 0 and at most 1, got '1.5'"),
    ("{run} --data {data} --out {out} --drop-top 0.1 --weight", 2,
     "argument --weight: not allowed with argument --drop-top"),
    ("{run} --data {data} --out {tmp}/out.csv --weight", 1, "unknown suffix '.csv'; expected .jsonl or .parquet"),
    ("{run} --data {short} --out {out} --weight", 1,
     "the dataset has 30 row(s), but the run measured dataset row 35"),
    ("{tmp} --data {data} --out {out} --weight", 1,
     "has no train_pairs table: measure the training pairs with EntanglementCallback(train_every=k)"),
])
def test_filter_errors_are_one_line(run_dir, hh_file, hh_rows, tmp_path, capsys, argv, code, match):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(r) + "\n" for r in hh_rows[:30]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = argv.format(run=run_dir, data=hh_file, short=short, out=out, tmp=tmp_path).split()
    _one_line_error(capsys, ["filter", *argv], code, match)
    assert not out.exists() and not (tmp_path / "out.csv").exists()
