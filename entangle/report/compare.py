"""The comparison report of ``entangle demo --compare``: figures and one HTML page from its four tables.

Reads only the tables :mod:`entangle.compare` writes (``dynamics``, ``band``, ``steps``, ``methods``; see its
docstring), so a notebook can filter them and re-plot. Every number a figure annotates is the ``methods`` table's
(the last point of each dynamics line is that method's ``median_d_chosen`` / ``median_d_rejected``), and every
number in the HTML table is the ``methods`` table's, with the exact value in the cell's ``data-value``.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import transforms
from matplotlib.figure import Figure

from entangle.report.figures import REGIME_COLORS, REGIME_LABELS, STEP_LABEL, FigureSpec, _figure
from entangle.report.html import _CSS, DrawnFigure, _cell, _figure_html, _save
from entangle.runio import read_table
from entangle.schema import REGIMES

METHOD_COLORS = ("#444444", "#2a6fb0", "#e08a1e", "#2a9d59", "#a23bb0", "#c8432b")

# (methods column, header) of the HTML table, in order
METHOD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("label", "method"),
    ("seconds_per_step", "s / step"),
    ("time_ratio", "time / step (× DPO)"),
    ("median_d_chosen", "median Δ log π(chosen)"),
    ("median_d_rejected", "median Δ log π(rejected)"),
    ("chosen_fell", "chosen fell (share)"),
    ("median_margin", "median margin"),
    ("median_reward_margin", "median reward margin"),
    ("ranking_accuracy", "ranking accuracy"),
    ("reward_accuracy", "reward accuracy"),
    ("share_in_band", "in band (share)"),
    ("share_both_fall", "both fall (share)"),
    ("share_both_rise", "both rise (share)"),
)


def _colors(frame: pd.DataFrame) -> dict[str, str]:
    return {m: METHOD_COLORS[i % len(METHOD_COLORS)] for i, m in enumerate(dict.fromkeys(frame.method))}


def changes(dynamics: pd.DataFrame) -> pd.DataFrame:
    """Per (method, step): medians over the probe pairs of the chosen and rejected log-prob changes since the
    method's first step, of the reward margin, and the ranking accuracy (share of pairs with margin > 0)."""
    first = dynamics[dynamics.step == dynamics.groupby("method").step.transform("min")]
    base = first[["method", "pair", "logp_chosen", "logp_rejected"]]
    d = dynamics.merge(base, on=["method", "pair"], suffixes=("", "_0"), sort=False)
    d = d.assign(d_chosen=d.logp_chosen - d.logp_chosen_0, d_rejected=d.logp_rejected - d.logp_rejected_0,
                 ranked=(d.margin > 0).astype(float))
    g = d.groupby(["method", "step"], sort=False)
    return pd.DataFrame({"d_chosen": g.d_chosen.median(), "d_rejected": g.d_rejected.median(),
                         "reward_margin": g.reward_margin.median(), "ranking_accuracy": g.ranked.mean()}).reset_index()


def logprob_dynamics(dynamics: pd.DataFrame) -> Figure:
    """Median change of the probe's chosen and rejected log-probs since step 0, per method (two panels)."""
    ch, colors = changes(dynamics), _colors(dynamics)
    fig, axes = _figure(2, sharey=True)
    ends = []
    for ax, col, title in ((axes[0], "d_chosen", "chosen"), (axes[1], "d_rejected", "rejected")):
        for m, f in ch.groupby("method", sort=False):
            ax.plot(f.step, f[col], marker="o", markersize=3.5, color=colors[m], label=m)
            ends.append((ax, f.step.iloc[-1], f[col].iloc[-1], colors[m]))
        ax.axhline(0, color="0.6", linewidth=0.6)
        ax.set(xlabel=STEP_LABEL, title=f"median Δ log π({title}) since step 0 (nats)")
    for ax in axes[:2]:
        _end_labels(ax, [(x, y, c) for a, x, y, c in ends if a is ax])
    axes[0].legend(fontsize=8.5)
    return fig


def _end_labels(ax, ends: list[tuple[float, float, str]], gap: float = 0.05) -> None:
    """Each line's last value written right of its last point, in its colour; labels closer than ``gap`` of the
    axis height are spread apart vertically (their order kept) so that none hides another."""
    if not ends:
        return
    left, right = ax.get_xlim()
    ax.set_xlim(left, right + 0.1 * (right - left))          # room for the labels inside the panel
    low, high = ax.get_ylim()
    step = gap * (high - low)
    order = sorted(range(len(ends)), key=lambda i: ends[i][1])
    # clusters of labels, each stacked a gap apart around the mean of its values; merged while two overlap
    clusters = [[ends[i][1]] for i in order]
    merged = True
    while merged:
        merged = False
        for k in range(len(clusters) - 1):
            top = np.mean(clusters[k]) + (len(clusters[k]) - 1) / 2 * step
            bottom = np.mean(clusters[k + 1]) - (len(clusters[k + 1]) - 1) / 2 * step
            if bottom - top < step:
                clusters[k:k + 2] = [clusters[k] + clusters[k + 1]]
                merged = True
                break
    placed = [np.mean(c) + (j - (len(c) - 1) / 2) * step for c in clusters for j in range(len(c))]
    shift = transforms.offset_copy(ax.transData, fig=ax.figure, x=4, y=0, units="points")
    for k, i in enumerate(order):
        x, y, color = ends[i]
        ax.text(x, placed[k], f"{y:.3g}", transform=shift, fontsize=8, color=color, va="center")


def margins(dynamics: pd.DataFrame) -> Figure:
    """Median reward margin (log-ratio of chosen minus rejected, against the reference) and ranking accuracy."""
    ch, colors = changes(dynamics), _colors(dynamics)
    fig, axes = _figure(2)
    for ax, col, title in ((axes[0], "reward_margin", "median reward margin (nats)"),
                           (axes[1], "ranking_accuracy", "ranking accuracy (share of pairs, log π_w > log π_l)")):
        for m, f in ch.groupby("method", sort=False):
            ax.plot(f.step, f[col], marker="o", markersize=3.5, color=colors[m], label=m)
        ax.set(xlabel=STEP_LABEL, title=title)
    axes[1].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8.5)
    return fig


def regime_shares(methods: pd.DataFrame) -> Figure:
    """Share of (pair, measured step) rows in each regime per method, with the in-band share written beside."""
    fig, (ax,) = _figure(1, size=(9.0, 0.6 * len(methods) + 1.6))
    y = np.arange(len(methods))
    left = np.zeros(len(methods))
    for r in REGIMES:
        share = methods[f"share_{r}"].to_numpy(dtype=float)
        ax.barh(y, share, left=left, color=REGIME_COLORS[r], label=REGIME_LABELS[r])
        left += share
    for i, v in enumerate(methods.share_in_band):
        ax.text(1.01, i, f"in band {v:.0%}", va="center", fontsize=8.5)
    ax.set(yticks=y, yticklabels=methods.label, xlim=(0, 1.18), xlabel="share of (pair, step) rows",
           title="Regimes of the step each method takes, per pair alone (THEORY §3)")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right", ncols=2)
    return fig


def band_plane(band: pd.DataFrame) -> Figure:
    """Each probe pair at each method's last measured step at (r*, r), with its band [ρ·r*, r*/ρ] as a vertical
    bar (open-ended up for ρ ≤ 0): chosen rises and rejected falls exactly when the point lies on its bar."""
    last = band[band.step == band.groupby("method").step.transform("max")]
    methods = list(dict.fromkeys(last.method))
    fig, axes = _figure(len(methods), size=(3.2 * len(methods) + 0.6, 3.8), sharey=True, sharex=True)
    finite = last[np.isfinite(last.r) & (last.r > 0)]
    lo = float(np.nanmin([finite.r.min(), finite.band_low[finite.band_low > 0].min(), finite.r_star.min()]))
    hi = float(np.nanmax([finite.r.max(), finite.band_high[np.isfinite(finite.band_high)].max(),
                          finite.r_star.max()]))
    for ax, m in zip(axes, methods, strict=True):
        f = finite[finite.method == m]
        top = np.where(np.isfinite(f.band_high), f.band_high, hi * 2)
        bottom = np.where(f.band_low > 0, f.band_low, lo / 2)
        ax.vlines(f.r_star, bottom, top, color="0.55", linewidth=1.2)
        for r in REGIMES:
            g = f[f.regime == r]
            ax.scatter(g.r_star, g.r, s=18, color=REGIME_COLORS[r], label=REGIME_LABELS[r], zorder=3)
        ax.plot([lo / 2, hi * 2], [lo / 2, hi * 2], color="0.75", linestyle=":", linewidth=1)
        ax.set(xscale="log", yscale="log", xlim=(lo / 1.5, hi * 1.5), ylim=(lo / 1.5, hi * 1.5),
               title=f"{m}: {f.in_band.mean():.0%} in band", xlabel="r* = ‖g_l‖ / ‖g_w‖")
        ax.minorticks_off()     # log minor ticks over several decades, on every panel: 2/3 of the report's time
        ax.title.set_fontsize(9.5)
    axes[0].set_ylabel("r = a_w / |a_l|")
    axes[0].legend(fontsize=7, loc="upper left")
    return fig


def step_time(methods: pd.DataFrame) -> Figure:
    """Median wall-clock seconds per training step (steps without a probe measurement), with the ratio to DPO."""
    fig, (ax,) = _figure(1, size=(7.5, 0.5 * len(methods) + 1.6))
    y = np.arange(len(methods))
    ax.barh(y, methods.seconds_per_step, color=[METHOD_COLORS[i % len(METHOD_COLORS)] for i in y])
    for i, (s, ratio) in enumerate(zip(methods.seconds_per_step, methods.time_ratio, strict=True)):
        ax.text(s, i, f" {s * 1000:.3g} ms ({ratio:.2f}×)", va="center", fontsize=8.5)
    ax.set(yticks=y, yticklabels=methods.label, xlim=(0, 1.35 * float(methods.seconds_per_step.max())),
           xlabel="seconds per training step (median)", title="Time per step")
    ax.invert_yaxis()
    return fig


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("compare_dynamics", "Probe log-prob dynamics", ("dynamics",), logprob_dynamics,
               "Median over the probe pairs of the change of the (unmasked) chosen and rejected log-probs since "
               "step 0; the numbers at the ends are the table's medians."),
    FigureSpec("compare_margins", "Margin and ranking accuracy", ("dynamics",), margins,
               "Median reward margin (log π − log π_ref of chosen minus rejected, unmasked) and the share of probe "
               "pairs the policy ranks right."),
    FigureSpec("compare_regimes", "Regime shares", ("methods",), regime_shares,
               "Predicted regime of each probe pair under the step each method takes (that pair alone, first "
               "order), over the measured steps; 'in band' equals the ideal share. Token-masked DPO is measured "
               "on its masked log-probs, the ones its step moves."),
    FigureSpec("compare_band", "The regime plane with each pair's band", ("band",), band_plane,
               "At each method's last measured step, each pair at (r*, r) with its band ρ·r* ≤ r ≤ r*/ρ: inside, "
               "chosen rises and rejected falls. DPO has r = 1; the pairwise normalised step sits at r = r* "
               "(dotted diagonal), the centre of every band."),
    FigureSpec("compare_time", "Time per step", ("methods",), step_time,
               "Median wall-clock time of the training steps in which the probe was not measured."),
)


def make_compare_report(table_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Draw :data:`FIGURES` from the tables in ``table_dir`` into ``out_dir`` (PNG) and write ``compare.html``
    there; returns its path."""
    tables = {name: read_table(table_dir, name) for name in ("dynamics", "band", "methods")}
    missing = [n for n, f in tables.items() if f.empty]
    if missing:
        raise FileNotFoundError(f"{table_dir}: no {', '.join(missing)} table (written by entangle demo --compare)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = [_save(spec, spec.draw(*(tables[t] for t in spec.tables)), out, ("png",), 110) for spec in FIGURES]
    page = out / "compare.html"
    page.write_text(render_compare(tables["methods"], drawn), encoding="utf-8")
    plt.close("all")
    return page


def methods_table(methods: pd.DataFrame) -> str:
    """The HTML ``<table id="methods">``: one row per method of :data:`METHOD_COLUMNS`."""
    head = "".join(f'<th data-column="{c}">{html.escape(h)}</th>' for c, h in METHOD_COLUMNS)
    rows = ["<tr>" + "".join(_cell(row[c], c) for c, _ in METHOD_COLUMNS) + "</tr>" for _, row in methods.iterrows()]
    return f'<table id="methods"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render_compare(methods: pd.DataFrame, figures: list[DrawnFigure]) -> str:
    """The comparison page as one string (no external resources)."""
    title = "entangle: mitigations side by side"
    claims = "".join(f"<li><b>{html.escape(r.label)}</b>: aims: {html.escape(r.aims)}; may cost: "
                     f"{html.escape(r.costs)}.</li>" for r in methods.itertuples())
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
             f"<style>{_CSS}</style></head><body><h1>{title}</h1>",
             f"<p>The same warmed model trained on the same pairs for {int(methods.steps.max())} steps by each "
             "method, the probe measured by the EntanglementCallback. Changes are since step 0, at the last step; "
             "shares are over all (pair, measured step) rows.</p>",
             f'<div class="scroll">{methods_table(methods)}</div>', f"<h2>What each method is for</h2><ul>{claims}</ul>",
             "<h2>Figures</h2>", *(_figure_html(f, i) for i, f in enumerate(figures, start=1)), "</body></html>"]
    return "\n".join(parts)
