"""entangle demo --compare at a tiny size: every table and figure, and the numbers they state agree."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from entangle.compare import CompareConfig, band_frame, run_compare
from entangle.report import compare as report
from entangle.runio import read_table

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS_RUN = ("dpo", "pairwise", "token_mask")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    # three methods keep it fast: the baseline and the two whose band and probe are special (DPO + NLL is TRL's own
    # DPOTrainer, DPO-Positive's trainer is tested in test_token_mask.py); two steps, the probe measured before the
    # first and after the last (every=2): two points of every dynamics line, the fewest that have a change
    cfg = CompareConfig(out=str(out), methods=METHODS_RUN, n_train=8, n_probe=4, sft_steps=2, dpo_steps=2, every=2,
                        batch_size=4)
    page = run_compare(cfg)
    return out, page, {t: read_table(out / "compare", t) for t in ("dynamics", "band", "steps", "methods")}


def test_every_table_and_figure(compared):
    out, page, t = compared
    names = list(METHODS_RUN)
    assert t["methods"].method.tolist() == names
    for name in names:                         # measured steps 0 and 2 (the last one at the end) for 4 pairs
        assert sorted(t["dynamics"][t["dynamics"].method == name].step.unique()) == [0, 2]
        assert sorted(t["band"][t["band"].method == name].step.unique()) == [0, 2]
        assert len(t["band"][t["band"].method == name]) == 2 * 4
        assert (out / "run" / name / "pairs").is_dir()
    assert page.name == "compare.html" and page.is_file()
    assert {p.name for p in page.parent.glob("*.png")} == {f"{s.name}.png" for s in report.FIGURES}
    html = page.read_text()
    for row in t["methods"].itertuples():      # the HTML table shows the table's exact numbers
        assert f'data-value="{row.time_ratio!r}"' in html and f'data-value="{row.share_in_band!r}"' in html


def test_numbers_agree(compared):
    _, _, t = compared
    dyn, band, methods = t["dynamics"], t["band"], t["methods"].set_index("method")
    assert methods.loc["dpo", "time_ratio"] == 1.0
    # every method starts from the same warmed model: the same log-probs at step 0, equal to the reference
    start = dyn[dyn.step == 0]
    for col in ("logp_chosen", "logp_rejected"):
        assert np.allclose(start.groupby("pair")[col].agg(np.ptp), 0)
    assert np.allclose(start.reward_margin, 0)
    # in band exactly when ideal; DPO has r = 1; the pairwise normalised step has r = r*, always in band
    assert (band.in_band == (band.regime == "ideal")).all()
    assert np.allclose(band[band.method == "dpo"].r, 1.0)
    pw = band[band.method == "pairwise"]
    assert np.allclose(pw.r, pw.r_star) and pw.in_band.all()
    on_band = (band.r >= band.band_low * (1 - 1e-9)) & (band.r <= band.band_high * (1 + 1e-9))
    assert (on_band == band.in_band).all()
    # the figures' numbers are the table's
    ch = report.changes(dyn)
    last = ch[ch.step == ch.step.max()].set_index("method")
    for col in ("d_chosen", "d_rejected"):
        assert last[col].to_numpy() == pytest.approx(methods[f"median_{col}"].to_numpy())
    fig = report.logprob_dynamics(dyn)
    ends = [float(line.get_ydata()[-1]) for line in fig.axes[0].get_lines() if line.get_label() in methods.index]
    assert ends == pytest.approx(methods.median_d_chosen.tolist())
    labels = fig.axes[0].texts                   # each line's end value, written apart from the others
    assert sorted(x.get_text() for x in labels) == sorted(f"{v:.3g}" for v in methods.median_d_chosen)
    ys, (low, high) = sorted(x.get_position()[1] for x in labels), fig.axes[0].get_ylim()
    assert (np.diff(ys) >= 0.05 * (high - low) * (1 - 1e-9)).all()
    texts = [x.get_text() for x in report.step_time(t["methods"].reset_index(drop=True)).axes[0].texts]
    assert all(f"({r:.2f}×)" in s for r, s in zip(methods.time_ratio, texts, strict=True))
    shares = report.regime_shares(t["methods"]).axes[0].texts
    assert [s.get_text() for s in shares] == [f"in band {v:.0%}" for v in methods.share_in_band]


def test_end_labels_of_lines_ending_together_are_spread_apart():
    """Two lines ending at nearly the same value get labels a gap apart, in the values' order, each with its own
    value and colour; a lone label stays at its value."""
    import matplotlib.pyplot as plt

    from entangle.report.compare import _end_labels

    fig, ax = plt.subplots()
    for y, color in ((0.0, "r"), (0.001, "g"), (1.0, "b")):
        ax.plot([0, 1], [0.5, y], color=color)
    _end_labels(ax, [(1, 0.001, "g"), (1, 0.0, "r"), (1, 1.0, "b")])
    low, high = ax.get_ylim()
    got = {t.get_text(): (t.get_position()[1], t.get_color()) for t in ax.texts}
    assert set(got) == {"0", "0.001", "1"} and got["0"][1] == "r" and got["0.001"][1] == "g"
    assert got["0.001"][0] - got["0"][0] >= 0.05 * (high - low) * (1 - 1e-9)
    assert got["1"][0] == pytest.approx(1.0)
    plt.close(fig)


def test_band_frame_by_hand():
    pairs = pd.DataFrame({"step": [0, 0], "pair": [0, 1], "norm2_chosen": [4.0, 1.0], "norm2_rejected": [1.0, 1.0],
                          "inner": [1.8, -0.5], "cosine": [0.9, -0.5], "a_chosen": [0.05, 0.05],
                          "a_rejected": [-0.05, -0.05]})
    dpo = band_frame("dpo", pairs)
    # pair 0: r* = 1/2, ρ = 0.9: band [0.45, 0.556]; r = 1 is above it: the rejected log-prob rises
    assert dpo.r_star.tolist() == pytest.approx([0.5, 1.0])
    assert dpo.band_low[0] == pytest.approx(0.45) and dpo.band_high[0] == pytest.approx(0.5 / 0.9)
    assert dpo.regime.tolist() == ["both_rise", "ideal"] and np.isinf(dpo.band_high[1])
    pw = band_frame("pairwise", pairs)
    assert pw.r.tolist() == pytest.approx(pw.r_star.tolist()) and pw.in_band.all()


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown or no methods"):
        run_compare(CompareConfig(methods=("dpo", "magic")))
