"""Figures of a run, each a pure function of tidy frames returning a matplotlib ``Figure``.

Every function takes the frames :func:`entangle.runio.read_run` returns (``pairs``, ``summary``, ``layers``,
``updates``, ...; :mod:`entangle.schema` states their columns), so a notebook user can filter a frame and re-plot.
Save a figure with ``fig.savefig("x.png")`` or ``fig.savefig("x.pdf")``.

To add a figure: write one function here and add one :class:`FigureSpec` to :data:`FIGURES`; the HTML report
draws every entry whose tables are present and notes the ones it has to skip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from entangle.metrics.agreement import sign_agreement as sign_agreement_of
from entangle.metrics.dataset import dataset_view
from entangle.report.tokens import token_heatmaps
from entangle.schema import (
    COVARIATES,
    LAYERS,
    PAIRS,
    REGIMES,
    SUMMARY,
    TOKENS,
    TRAIN_PAIRS,
    UPDATES,
    group_column,
)

REGIME_COLORS = {
    "ideal": "#2a9d59",
    "both_rise": "#e08a1e",
    "both_fall": "#3461c1",
    "chosen_falls_rejected_rises": "#a23bb0",
}
REGIME_LABELS = {
    "ideal": "ideal (chosen ↑, rejected ↓)",
    "both_rise": "both rise",
    "both_fall": "both fall",
    "chosen_falls_rejected_rises": "chosen ↓, rejected ↑",
}
SIDE_COLORS = {"chosen": "#2a6fb0", "rejected": "#c8432b"}
STEP_LABEL = "training step"
WIDE = (10.0, 4.0)


def _figure(ncols: int = 1, size: tuple[float, float] = WIDE, **kw) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(1, ncols, figsize=size, layout="constrained", squeeze=False, **kw)
    return fig, axes[0]


def _finite(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """Rows of ``frame`` whose ``columns`` are all finite numbers."""
    ok = np.isfinite(frame[list(columns)].to_numpy(dtype=float)).all(axis=1)
    return frame[ok]


def step_quantiles(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per step: mean, q10, q50, q90 and count of the finite values of ``column`` (one row per step)."""
    f = _finite(frame, column)
    g = f.groupby("step", sort=True)[column]
    out = pd.DataFrame({
        "mean": g.mean(), "q10": g.quantile(0.1), "q50": g.quantile(0.5), "q90": g.quantile(0.9), "n": g.size(),
    })
    return out.reset_index()


def _band(ax, q: pd.DataFrame, center: str, color: str, label: str, dodge: float = 0.0) -> None:
    """A line at ``center`` with the q10–q90 band of a :func:`step_quantiles` frame.

    A single step gets error bars instead, shifted by ``dodge`` steps so that several series stay apart.
    """
    if len(q) == 1:
        err = np.array([q[center] - q["q10"], q["q90"] - q[center]]).reshape(2, 1)
        ax.errorbar(q["step"] + dodge, q[center], yerr=err, color=color, marker="o", markersize=5, capsize=6,
                    label=label)
    else:
        ax.fill_between(q["step"], q["q10"], q["q90"], color=color, alpha=0.18, linewidth=0)
        ax.plot(q["step"], q[center], color=color, marker="o", markersize=3.5, label=label)
    _step_axis(ax, q["step"])


def _step_axis(ax, steps) -> None:
    """Integer step ticks; a run with few measured steps gets a tick at each."""
    steps = np.unique(np.asarray(steps))
    if len(steps) <= 12:
        ax.set_xticks(steps)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(steps) == 1:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)


# ---- 1. log-prob dynamics --------------------------------------------------------------------------------

def pair_groups(pairs: pd.DataFrame, covariates: pd.DataFrame | None = None) -> pd.Series | None:
    """Each row's pair group (a :data:`entangle.schema.GROUP_COLUMNS` column of ``pairs``, else of ``covariates``
    joined on ``pair``) as strings, indexed like ``pairs``; None when neither has one."""
    frames = [pairs] + ([covariates] if covariates is not None else [])
    column = group_column(*frames)
    if column is None:
        return None
    if column in pairs:
        return pairs[column].astype(str)
    labels = covariates.drop_duplicates("pair").set_index("pair")[column].astype(str)
    return pairs["pair"].map(labels).fillna("no group")


def logprob_changes(pairs: pd.DataFrame, covariates: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (pair, step): ``chosen`` and ``rejected``, each log-prob's change since the pair's first measured step,
    the ``margin`` log π(chosen) − log π(rejected) and, when there is one, the pair's ``group``."""
    f = _finite(pairs, "logp_chosen", "logp_rejected").sort_values(["pair", "step"])
    first = f.groupby("pair")[["logp_chosen", "logp_rejected"]].transform("first")
    d = pd.DataFrame({
        "step": f["step"], "pair": f["pair"],
        "chosen": f["logp_chosen"] - first["logp_chosen"],
        "rejected": f["logp_rejected"] - first["logp_rejected"],
        "margin": f["logp_chosen"] - f["logp_rejected"],
    })
    groups = pair_groups(f, covariates)
    return d if groups is None else d.assign(group=groups)


def group_dynamics(pairs: pd.DataFrame, covariates: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """Per (group, step), groups in order of appearance: ``n`` pairs and the means over them of ``chosen``,
    ``rejected`` (change since the first step, nats) and ``margin``; None when the pairs have no group."""
    d = logprob_changes(pairs, covariates)
    if "group" not in d:
        return None
    order = list(dict.fromkeys(d["group"]))
    out = d.groupby(["group", "step"], sort=False).agg(
        n=("pair", "size"), chosen=("chosen", "mean"), rejected=("rejected", "mean"), margin=("margin", "mean"))
    out = out.reset_index()
    out["group"] = pd.Categorical(out["group"], order, ordered=True)
    return out.sort_values(["group", "step"]).reset_index(drop=True).astype({"group": str})


def logprob_dynamics(pairs: pd.DataFrame, covariates: pd.DataFrame | None = None) -> Figure:
    """Chosen and rejected log-probs (change since each pair's first measured step) and the margin, over steps.

    Without pair groups: means over the probe pairs with their 10–90% bands. With groups (a ``kind`` or
    ``group`` column in ``pairs`` or ``covariates``): one line per group, the mean over its pairs
    (:func:`group_dynamics`), so that a group that behaves (say, unrelated pairs) is not averaged away. Both
    curves rising or both falling together is the pitfall gradient entanglement causes.
    """
    groups = group_dynamics(pairs, covariates)
    if groups is not None and groups["step"].nunique() > 1:
        return _group_dynamics_figure(groups)
    f = _finite(pairs, "logp_chosen", "logp_rejected")
    d = logprob_changes(pairs)
    fig, (ax, bx) = _figure(2)
    single = d["step"].nunique() == 1   # nothing has changed yet: show the log-probs themselves
    for side in ("chosen", "rejected"):
        column = f"logp_{side}" if single else side
        _band(ax, step_quantiles(f if single else d, column), "mean", SIDE_COLORS[side], side)
    if not single:
        ax.axhline(0, color="0.4", linewidth=0.8)
    ax.set(xlabel=STEP_LABEL, ylabel="log-prob (nats)" if single else "Δ log-prob since first step (nats)",
           title="Sequence log-probs (mean, 10–90% band)")
    ax.legend(loc="best", fontsize=9)
    _band(bx, step_quantiles(d, "margin"), "mean", "0.25", "margin")
    bx.set(xlabel=STEP_LABEL, ylabel="log π(chosen) − log π(rejected) (nats)", title="Margin (mean, 10–90% band)")
    return fig


def _group_dynamics_figure(groups: pd.DataFrame) -> Figure:
    """Three panels (Δ chosen, Δ rejected, margin), one line per group of :func:`group_dynamics`."""
    order = list(dict.fromkeys(groups["group"]))
    colors = dict(zip(order, plt.get_cmap("viridis_r")(np.linspace(0.1, 0.9, max(len(order), 2))), strict=False))
    fig, axes = _figure(3, size=(12.0, 4.0), sharex=True)
    panels = (("chosen", "Δ log π(chosen) since first step (nats)", "Chosen log-prob"),
              ("rejected", "Δ log π(rejected) since first step (nats)", "Rejected log-prob"),
              ("margin", "log π(chosen) − log π(rejected) (nats)", "Margin"))
    for ax, (column, ylabel, title) in zip(axes, panels, strict=True):
        for g in order:
            rows = groups[groups["group"] == g]
            ax.plot(rows["step"], rows[column], color=colors[g], marker="o", markersize=3.5,
                    label=f"{g} ({int(rows['n'].max())})")
        if column != "margin":
            ax.axhline(0, color="0.4", linewidth=0.8)
        ax.set(xlabel=STEP_LABEL, ylabel=ylabel, title=f"{title} (mean per pair group)")
        _step_axis(ax, groups["step"])
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(order), fontsize=9,
               frameon=False, title="pair group (pairs)", title_fontsize=9)
    return fig


# ---- 2. gradient statistics --------------------------------------------------------------------------------

def gradient_statistics(pairs: pd.DataFrame) -> Figure:
    """‖g_w‖², ‖g_l‖², ⟨g_w, g_l⟩ and the entanglement ratio ρ = ⟨g_w, g_l⟩ / min(‖g_w‖², ‖g_l‖²) over steps.

    Medians over the probe pairs with 10–90% bands; ρ > 1 (dashed line) means one of the two log-probs moves the
    wrong way under a DPO step (docs/theory.md §3).
    """
    fig, (ax, bx) = _figure(2)
    series = (("norm2_chosen", "‖g_w‖² (chosen)", SIDE_COLORS["chosen"]),
              ("norm2_rejected", "‖g_l‖² (rejected)", SIDE_COLORS["rejected"]),
              ("inner", "⟨g_w, g_l⟩", "0.25"))
    quantiles = [step_quantiles(pairs, column) for column, _, _ in series]
    for q, (_, label, color), dodge in zip(quantiles, series, (-0.15, 0.0, 0.15), strict=True):
        _band(ax, q, "q50", color, label, dodge)
    band = pd.concat(quantiles)[["q10", "q50", "q90"]].to_numpy(dtype=float)
    if len(band) and band.min() > 0:
        ax.set_yscale("log")
    elif len(band):
        # a negative inner product in the band: log scale away from zero, linear within a decade-aligned
        # threshold a decade below the smallest positive median (decade-aligned so tick labels do not collide)
        positive = band[:, 1][band[:, 1] > 0]
        ax.set_yscale("symlog", linthresh=10.0 ** (np.floor(np.log10(positive.min())) - 1) if len(positive) else 1.0)
    if len(band):  # autoscaling misses error-bar caps on a log axis: span the band explicitly, with a margin
        lo, hi = band.min(), band.max()
        ax.set_ylim(lo * (0.6 if lo > 0 else 1.6), hi * 1.6)
    ax.set(xlabel=STEP_LABEL, ylabel="squared norm / inner product (nats²)",
           title="Gradient statistics (median, 10–90% band)")
    _band(bx, step_quantiles(pairs, "ratio"), "q50", "#6a3d9a", "median ρ")
    bx.axhline(1.0, color="#c8432b", linestyle="--", linewidth=1.2, label="threshold ρ = 1")
    bx.set(xlabel=STEP_LABEL, ylabel="entanglement ratio ρ (unitless)",
           title="ρ = ⟨g_w, g_l⟩ / min(‖g_w‖², ‖g_l‖²)")
    handles, labels = ax.get_legend_handles_labels()
    more = bx.get_legend_handles_labels()
    fig.legend(handles + more[0], labels + more[1], loc="outside lower center", ncols=5, fontsize=9, frameon=False)
    return fig


# ---- 3. the regime plane ----------------------------------------------------------------------------------

def chosen_falls_boundary(cosine: np.ndarray, r: float = 1.0) -> np.ndarray:
    """log10(‖g_w‖/‖g_l‖) below which the chosen log-prob falls, per cosine (docs/theory.md §3).

    Chosen falls iff cos > r ‖g_w‖/‖g_l‖, i.e. log10(‖g_w‖/‖g_l‖) < log10(cos / r); NaN where cos <= 0
    (the chosen log-prob then always rises). ``r = a_w / |a_l|`` (1 for DPO).
    """
    c = np.asarray(cosine, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c > 0, np.log10(c / r), np.nan)


def rejected_rises_boundary(cosine: np.ndarray, r: float = 1.0) -> np.ndarray:
    """log10(‖g_w‖/‖g_l‖) above which the rejected log-prob rises, per cosine (docs/theory.md §3).

    Rejected rises iff cos > ‖g_l‖ / (r ‖g_w‖), i.e. log10(‖g_w‖/‖g_l‖) > -log10(r cos); NaN where cos <= 0.
    """
    c = np.asarray(cosine, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c > 0, -np.log10(r * c), np.nan)


def plane_regime(cosine: np.ndarray, log_norm_ratio: np.ndarray, r: float | np.ndarray = 1.0) -> np.ndarray:
    """Regime of each point of the plane (cosine, log10 ‖g_w‖/‖g_l‖) for a margin loss with r = a_w / |a_l|.

    The analytic twin of ``pair_frame``'s ``regime`` column (which comes from the signs of the predicted changes).
    """
    c, y = np.asarray(cosine, dtype=float), np.asarray(log_norm_ratio, dtype=float)
    r = np.broadcast_to(np.asarray(r, dtype=float), c.shape)
    chosen_falls = y < chosen_falls_boundary(c, 1.0) - np.log10(r)     # NaN compares False: cos <= 0 never falls
    rejected_rises = y > rejected_rises_boundary(c, 1.0) - np.log10(r)
    names = np.array(["ideal", "both_rise", "both_fall", "chosen_falls_rejected_rises"], dtype=object)
    return names[rejected_rises.astype(int) + 2 * chosen_falls.astype(int)]


def coefficient_ratio(pairs: pd.DataFrame) -> pd.Series:
    """r = a_w / |a_l| per pair, NaN where the loss is not margin-shaped there (a_w <= 0 or a_l >= 0)."""
    a_w, a_l = pairs["a_chosen"].astype(float), pairs["a_rejected"].astype(float)
    return (a_w / -a_l).where((a_w > 0) & (a_l < 0))


def _plane_r(pairs: pd.DataFrame) -> tuple[float, str]:
    """The r to draw the boundaries with, and a note on where it came from."""
    if not {"a_chosen", "a_rejected"} <= set(pairs.columns):
        return 1.0, "boundaries for r = 1 (DPO; the frame has no coefficients)"
    r = coefficient_ratio(pairs).dropna()
    if r.empty:
        return 1.0, "boundaries for r = 1 (no pair has a_w > 0 > a_l)"
    med = float(r.median())
    if np.allclose(r, 1.0, rtol=1e-6):
        return 1.0, "boundaries for r = a_w/|a_l| = 1 (DPO)"
    spread = "" if np.allclose(r, med, rtol=1e-3) else f", pairs range {r.min():.3g}–{r.max():.3g}"
    return med, f"dashed: r = 1 (DPO); solid: median r = a_w/|a_l| = {med:.3g}{spread}"


def regime_plane(pairs: pd.DataFrame, r: float | None = None) -> Figure:
    """Every (pair, step) at (cos(g_w, g_l), log10 ‖g_w‖/‖g_l‖), coloured by regime, with the analytic boundaries.

    The boundaries (docs/theory.md §3) are drawn for r = 1 (DPO) and, when the frame's coefficients give another
    r = a_w/|a_l|, for their median (or for ``r`` when given). Chosen falls left of/below the "chosen falls"
    curve, rejected rises above the "rejected rises" curve; both need a positive cosine.
    """
    f = _finite(pairs, "cosine", "norm2_chosen", "norm2_rejected")
    f = f[(f["norm2_chosen"] > 0) & (f["norm2_rejected"] > 0)]
    y = 0.5 * np.log10(f["norm2_chosen"] / f["norm2_rejected"])
    r_draw, note = (float(r), f"boundaries for r = {r:.3g}") if r is not None else _plane_r(pairs)

    fig, (ax,) = _figure(1, size=(7.5, 5.2))
    span = max(1.0, float(np.abs(y).max()) * 1.15) if len(y) else 1.0
    c = np.linspace(1e-4, 1.0, 600)
    lo, hi = np.full_like(c, -span), np.full_like(c, span)
    shade_w = np.clip(chosen_falls_boundary(c, r_draw), -span, span)
    shade_l = np.clip(rejected_rises_boundary(c, r_draw), -span, span)
    ax.fill_between(c, lo, shade_w, color=REGIME_COLORS["both_fall"], alpha=0.10, linewidth=0)
    ax.fill_between(c, shade_l, hi, color=REGIME_COLORS["both_rise"], alpha=0.10, linewidth=0)
    curves = [(1.0, "--" if r_draw != 1.0 else "-")] + ([(r_draw, "-")] if r_draw != 1.0 else [])
    for rr, style in curves:
        ax.plot(c, chosen_falls_boundary(c, rr), color=REGIME_COLORS["both_fall"], linestyle=style, linewidth=1.4)
        ax.plot(c, rejected_rises_boundary(c, rr), color=REGIME_COLORS["both_rise"], linestyle=style, linewidth=1.4)
    ax.text(0.98, -0.93 * span, "chosen falls", color=REGIME_COLORS["both_fall"], ha="right", va="bottom", fontsize=9)
    ax.text(0.98, 0.93 * span, "rejected rises", color=REGIME_COLORS["both_rise"], ha="right", va="top", fontsize=9)

    size = 28 if len(f) <= 200 else 10
    _plane_points(ax, f["cosine"], y, f["regime"], size, label=True)
    corner = ((f["cosine"] > 0.9) & (y.abs() < 0.1 * span)).to_numpy()
    if corner.any():     # pairs near (1, 0), where both boundaries meet, pile up: zoom in on them
        zoom = ax.inset_axes([0.06, 0.06, 0.3, 0.3])
        _plane_points(zoom, f["cosine"][corner], y[corner], f["regime"][corner], size)
        c_lo, y_hi = float(f["cosine"][corner].min()), float(y[corner].abs().max()) * 1.3 or 0.01
        cz = np.linspace(max(c_lo, 1e-4), 1.0, 200)
        zoom.plot(cz, chosen_falls_boundary(cz, r_draw), color=REGIME_COLORS["both_fall"], linewidth=1)
        zoom.plot(cz, rejected_rises_boundary(cz, r_draw), color=REGIME_COLORS["both_rise"], linewidth=1)
        zoom.set(xlim=(c_lo - 0.1 * (1 - c_lo) - 1e-3, 1.0 + 0.05 * (1 - c_lo) + 1e-3), ylim=(-y_hi, y_hi))
        zoom.tick_params(labelsize=7)
        zoom.set_title("near (1, 0)", fontsize=8)
        ax.indicate_inset_zoom(zoom, edgecolor="0.5")
    ax.axhline(0, color="0.6", linewidth=0.6)
    ax.axvline(0, color="0.6", linewidth=0.6)
    ax.set(xlim=(-1.02, 1.04), ylim=(-span, span), xlabel="gradient cosine cos(g_w, g_l) (unitless)",
           ylabel="log10 ‖g_w‖ / ‖g_l‖ (unitless)", title=f"Regime plane: every pair at every step\n{note}")
    ax.title.set_fontsize(10.5)
    if len(f):
        ax.legend(loc="upper left", fontsize=8.5, title="regime (points)", title_fontsize=8.5)
    return fig


def _plane_points(ax, cosine: pd.Series, y: pd.Series, regime: pd.Series, size: float, label: bool = False) -> None:
    """Scatter the points of the regime plane, the rarest regime on top; never clipped at the frame."""
    counts = regime.value_counts()
    for name in sorted((r for r in REGIMES if counts.get(r, 0)), key=lambda r: -counts[r]):
        m = (regime == name).to_numpy()
        ax.scatter(cosine[m], y[m], s=size, alpha=0.75, color=REGIME_COLORS[name], edgecolor="white",
                   linewidth=0.4, label=f"{REGIME_LABELS[name]} ({int(m.sum())})" if label else None, zorder=3,
                   clip_on=False)


# ---- 4. regime shares --------------------------------------------------------------------------------------

def _stack(ax, summary: pd.DataFrame, prefix: str, title: str) -> None:
    s = summary.sort_values("step")
    regimes = [r for r in REGIMES if f"{prefix}{r}" in s and (r != "chosen_falls_rejected_rises"
                                                              or s[f"{prefix}{r}"].fillna(0).gt(0).any())]
    shares = [100 * s[f"{prefix}{r}"].fillna(0).to_numpy() for r in regimes]
    colors = [REGIME_COLORS[r] for r in regimes]
    labels = [REGIME_LABELS[r] for r in regimes]
    steps = s["step"].to_numpy()
    if len(steps) > 1:
        ax.stackplot(steps, *shares, colors=colors, labels=labels, alpha=0.85)
        _step_axis(ax, steps)
        ax.set_xlim(steps.min(), steps.max())
    else:
        bottom = 0.0
        for v, color, label in zip(shares, colors, labels, strict=True):
            ax.bar(steps, v, bottom=bottom, color=color, label=label, width=0.6)
            bottom = bottom + v
        _step_axis(ax, steps)
    ax.set(ylim=(0, 100), xlabel=STEP_LABEL, ylabel="share of probe pairs (%)", title=title)


def regime_shares(summary: pd.DataFrame) -> Figure:
    """Stacked shares of the regimes over steps, from ``summary``'s ``share_*`` (per pair, docs/theory.md §3) and,
    when present, ``batch_share_*`` columns (each pair's changes under the whole minibatch step, §4)."""
    has_batch = any(c.startswith("batch_share_") for c in summary.columns)
    fig, axes = _figure(2 if has_batch else 1, size=WIDE if has_batch else (6.0, 4.0))
    _stack(axes[0], summary, "share_", "Regimes, each pair alone (§3)")
    if has_batch:
        _stack(axes[1], summary, "batch_share_", "Regimes within the minibatch step (§4)")
        axes[1].sharey(axes[0])
    handles, labels = axes[-1].get_legend_handles_labels()
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += [x for x, y in zip(h, lab, strict=True) if y not in labels]
        labels += [y for y in lab if y not in labels]
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9, frameon=False)
    return fig


# ---- 5. layer breakdown -------------------------------------------------------------------------------------

def _layer_key(name: str) -> tuple[int, float, str]:
    if name == "embed":
        return (0, 0, name)
    if name.startswith("layer "):
        try:
            return (1, float(name.split()[1]), name)
        except ValueError:
            pass
    return (2 if name == "head" else 3, 0, name)


def layer_order(names) -> list[str]:
    """Layer names in model order: ``embed``, ``layer 0``, ``layer 1``, …, ``head``, then anything else."""
    return sorted(set(names), key=_layer_key)


def layer_shares(layers: pd.DataFrame) -> pd.DataFrame:
    """Layer × step table of each layer's share of ⟨g_w, g_l⟩, summed over pairs (rows in model order).

    Shares of a step sum to 1; a layer whose gradients point apart has a negative share.
    """
    sums = layers.groupby(["layer", "step"])["inner"].sum().unstack("step")
    return (sums / sums.sum(axis=0)).reindex(layer_order(sums.index))


def layer_breakdown(layers: pd.DataFrame) -> Figure:
    """Heatmap of layer × step: the share (%) of the summed inner product ⟨g_w, g_l⟩ each layer carries."""
    share = layer_shares(layers)
    n_layers, n_steps = share.shape
    fig, (ax,) = _figure(1, size=(max(6.0, min(10.0, 3.0 + 0.5 * n_steps)), max(3.2, 1.2 + 0.32 * n_layers)))
    values = 100 * share.to_numpy(dtype=float)          # cells and colour bar in percent
    vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    norm = TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax) if vmax > 0 else None
    im = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    steps = list(share.columns)
    stride = max(1, int(np.ceil(n_steps / 12)))
    ax.set_xticks(range(0, n_steps, stride), [str(s) for s in steps[::stride]])
    ax.set_yticks(range(n_layers), list(share.index))
    if n_steps <= 12 and n_layers <= 16:
        for i in range(n_layers):
            for j in range(n_steps):
                v = values[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(v) > 0.6 * vmax else "0.15")
    ax.set(xlabel=STEP_LABEL, ylabel="layer", title="Share of ⟨g_w, g_l⟩ per layer (summed over pairs; cells in %)")
    ax.title.set_fontsize(10.5)
    fig.colorbar(im, ax=ax, label="share of ⟨g_w, g_l⟩ (%)", shrink=0.9)
    return fig


# ---- 6. predicted vs observed ---------------------------------------------------------------------------------

def prediction_column(updates: pd.DataFrame) -> str:
    """The prediction to check: ``pred_update`` (along the real update, docs/theory.md §5) when it has finite values,
    else ``pred_gradient`` (along the plain gradient step)."""
    for column in ("pred_update", "pred_gradient"):
        if column in updates and np.isfinite(updates[column].to_numpy(dtype=float)).any():
            return column
    raise ValueError("updates table has no finite pred_update or pred_gradient values")


def sign_agreement(updates: pd.DataFrame, column: str | None = None) -> pd.DataFrame:
    """Per step and side: :func:`entangle.metrics.agreement.sign_agreement` of the prediction ``column`` (default
    :func:`prediction_column`), the share of the sequences that moved whose predicted change has the sign of the
    observed one; columns step, side, agreement."""
    column = column or prediction_column(updates)
    rows = [{"step": step, "side": side,
             "agreement": sign_agreement_of(g["observed"], g[column], g["logp_before"])}
            for (step, side), g in updates.groupby(["step", "side"], sort=True)]
    return pd.DataFrame(rows, columns=["step", "side", "agreement"])


def prediction_check(updates: pd.DataFrame) -> Figure:
    """First-order predicted vs observed change of each sequence's log-prob, and their sign agreement over steps."""
    column = prediction_column(updates)
    f = _finite(updates, column, "observed")
    fig, (ax, bx) = _figure(2)
    for side in ("chosen", "rejected"):
        s = f[f["side"] == side]
        ax.scatter(s[column], s["observed"], s=14, alpha=0.6, color=SIDE_COLORS[side], label=side,
                   edgecolor="none")
    lim = float(np.abs(f[[column, "observed"]].to_numpy()).max()) * 1.08 if len(f) else 1.0
    ax.plot([-lim, lim], [-lim, lim], color="0.3", linestyle="--", linewidth=1, label="y = x")
    ax.axhline(0, color="0.75", linewidth=0.6)
    ax.axvline(0, color="0.75", linewidth=0.6)
    what = "along the real update" if column == "pred_update" else "along the gradient step"
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel=f"predicted Δ log-prob, {what} (nats)",
           ylabel="observed Δ log-prob (nats)", title="First-order prediction vs observation")
    ax.set_aspect("equal", adjustable="box")
    ax.legend(loc="upper left", fontsize=9)
    agree = sign_agreement(updates, column)
    for side, style in (("chosen", {"marker": "o", "markersize": 7, "markerfacecolor": "none"}),
                        ("rejected", {"marker": "s", "markersize": 3.5, "linestyle": "--"})):
        a = agree[agree["side"] == side]   # distinct markers: the two lines often coincide (e.g. at 100%)
        bx.plot(a["step"], 100 * a["agreement"], color=SIDE_COLORS[side], label=side, **style)
    _step_axis(bx, agree["step"])
    bx.axhline(50, color="0.6", linestyle=":", linewidth=1, label="chance")
    bx.set(ylim=(-3, 103), xlabel=STEP_LABEL, ylabel="sign agreement (% of sequences)",
           title="Predicted and observed change agree in sign")
    bx.legend(loc="lower right", fontsize=9)
    return fig


def shared_content(pairs: pd.DataFrame, covariates: pd.DataFrame) -> Figure:
    """Entanglement against how much a pair's two responses share (docs/theory.md §7).

    Left: median gradient cosine over steps per group of pairs (a ``kind`` or ``group`` column of the pairs or the
    covariates, else terciles of token overlap). Right: every (pair, step) by token-set Jaccard overlap and cosine.
    """
    cov = covariates.drop(columns=[c for c in ("step",) if c in covariates]).drop_duplicates("pair")
    frame = _finite(pairs, "cosine").merge(cov, on="pair", how="inner")
    if (column := group_column(frame)) is not None:
        group = frame[column].astype(str)
        order = list(dict.fromkeys(cov[column].astype(str) if column in cov else group))
    else:
        group = pd.qcut(frame["jaccard"].rank(method="first"), 3, labels=["low overlap", "mid overlap",
                                                                          "high overlap"]).astype(str)
        order = ["low overlap", "mid overlap", "high overlap"]
    frame = frame.assign(group=group)
    colors = dict(zip(order, plt.get_cmap("viridis_r")(np.linspace(0.1, 0.9, max(len(order), 2))), strict=False))
    fig, (ax, bx) = _figure(2)
    for g in order:
        q = step_quantiles(frame[frame["group"] == g], "cosine")
        if len(q):
            _band(ax, q, "q50", colors[g], g)
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.set(xlabel=STEP_LABEL, ylabel="cos(g_w, g_l) (median, q10–q90)", title="Gradient cosine by pair group")
    ax.legend(fontsize=9, loc="best")
    for g in order:
        sub = frame[frame["group"] == g]
        bx.scatter(sub["jaccard"], sub["cosine"], s=14, alpha=0.6, color=colors[g], label=g)
    bx.axhline(0, color="0.6", linewidth=0.8)
    bx.set(xlabel="token overlap of the two responses (Jaccard, 0–1)", ylabel="cos(g_w, g_l)",
           title="Shared tokens entangle the gradients")
    return fig


# ---- 8. ranking accuracy ---------------------------------------------------------------------------------------

RANKING_SERIES: tuple[tuple[str, str, str, dict], ...] = (
    ("ranking_accuracy", "policy: log π(chosen) > log π(rejected)", "#2a6fb0", {"marker": "o"}),
    ("ranking_accuracy_ref_adjusted", "policy, reference-adjusted (DPO implicit reward)", "#2a9d59",
     {"marker": "s", "markersize": 3.5}),
    ("ref_ranking_accuracy", "reference model", "0.15", {"linestyle": (0, (4, 3)), "linewidth": 2.2,
                                                          "marker": "none", "zorder": 4}),
    ("idealized_ranking_accuracy", "idealized (DPO optimum, docs/theory.md §8)", "#a23bb0", {"linestyle": ":",
                                                                                       "marker": "D"}),
)


def ranking_accuracy(summary: pd.DataFrame) -> Figure:
    """Ranking accuracy of the probe pairs over steps (docs/theory.md §8), from the ``summary`` table.

    Left: the share of pairs the policy ranks right (chosen log-prob above rejected), the same after subtracting
    the reference's log-probs (the DPO implicit reward), the reference's own, and — when the summary has it (a
    per-pair preference probability was given) — the idealized ranking accuracy of the DPO optimum. Right, with
    the idealized accuracy: the gap idealized − policy, in percentage points.
    """
    s = summary.sort_values("step")
    present = [x for x in RANKING_SERIES if x[0] in s and np.isfinite(s[x[0]].to_numpy(dtype=float)).any()]
    if not present or present[0][0] != "ranking_accuracy":
        raise KeyError("ranking_accuracy")
    gap = "ranking_accuracy_gap" in s and np.isfinite(s["ranking_accuracy_gap"].to_numpy(dtype=float)).any()
    fig, axes = _figure(2) if gap else _figure(1, size=(7.5, 4.0))
    ax = axes[0]
    steps = s["step"].to_numpy()
    for column, label, color, style in present:
        style = {"markersize": 5, "linewidth": 1.6, **style}
        ax.plot(steps, 100 * s[column].to_numpy(dtype=float), color=color, label=label, **style)
    ax.axhline(50, color="0.7", linestyle=":", linewidth=1)
    ax.set(ylim=(-3, 103), xlabel=STEP_LABEL, ylabel="ranking accuracy (% of probe pairs)",
           title="Ranking accuracy over steps")
    ax.legend(loc="best", fontsize=8.5)
    _step_axis(ax, steps)
    if gap:
        bx = axes[1]
        g = 100 * s["ranking_accuracy_gap"].to_numpy(dtype=float)
        bx.bar(steps, g, width=0.6 * (np.diff(steps).min() if len(steps) > 1 else 1.0),
               color=np.where(g >= 0, "#a23bb0", "#2a9d59"), alpha=0.8)
        bx.axhline(0, color="0.4", linewidth=0.8)
        bx.set(xlabel=STEP_LABEL, ylabel="idealized − policy (percentage points)",
               title="Ranking accuracy gap to the DPO optimum")
        _step_axis(bx, steps)
    return fig


# ---- 9. the dataset view ----------------------------------------------------------------------------------------

COSINE_BINS = np.linspace(-1.0, 1.0, 41)       # bins of width 0.05 over every possible cosine


def dataset_entanglement(train_pairs: pd.DataFrame) -> Figure:
    """The training dataset's entanglement, from :func:`entangle.metrics.dataset.dataset_view` of ``train_pairs``.

    Left: histogram of each measured dataset row's mean gradient cosine (bins of 0.05), stacked by the regime of
    its latest measurement. Right: the same scores sorted from the most entangled down, against the share of the
    measured rows at or above each: the mean cosine above which ``entangle filter --drop-top FRACTION`` drops.
    """
    view = dataset_view(train_pairs)
    measured = view[np.isfinite(view["cosine_mean"].to_numpy(dtype=float))]
    fig, (ax, bx) = _figure(2)
    bottom = np.zeros(len(COSINE_BINS) - 1)
    for regime in REGIMES:
        counts, _ = np.histogram(measured.loc[measured["regime_latest"] == regime, "cosine_mean"], COSINE_BINS)
        if counts.any():
            ax.bar(COSINE_BINS[:-1], counts, width=np.diff(COSINE_BINS), bottom=bottom, align="edge",
                   color=REGIME_COLORS[regime], label=f"{REGIME_LABELS[regime]} ({int(counts.sum())})",
                   edgecolor="white", linewidth=0.4)
            bottom += counts
    ax.axvline(0, color="0.6", linewidth=0.8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    unmeasured = len(view) - len(measured)
    ax.set(xlim=(-1.02, 1.02), xlabel="mean cos(g_w, g_l) over the steps a row was measured at",
           ylabel="dataset rows", title=f"{len(measured)} training rows measured"
           + (f" ({unmeasured} more seen, always excluded)" if unmeasured else ""))
    if len(measured):
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=9, frameon=False,
                   title="regime at the latest measurement (rows)", title_fontsize=9)
    ranked = np.sort(measured["cosine_mean"].to_numpy(dtype=float))[::-1]
    share = 100 * np.arange(1, len(ranked) + 1) / max(len(ranked), 1)
    bx.step(share, ranked, where="post", color="#6a3d9a")
    bx.axhline(0, color="0.6", linewidth=0.8)
    bx.set(xlim=(0, 100), ylim=(-1.02, 1.02), xlabel="share of measured rows at or above it (%)",
           ylabel="mean cos(g_w, g_l)", title="Most entangled first: what --drop-top cuts")
    return fig


# ---- registry ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FigureSpec:
    """One report figure: file stem, heading, the tables ``draw`` takes (in order), a caption, and the tables
    ``draw`` also takes, after those, when the run has them (None when it does not)."""

    name: str
    title: str
    tables: tuple[str, ...]
    draw: Callable[..., Figure]
    caption: str
    many: bool = False   # ``draw`` returns several figures: a list of (file suffix, label, Figure)
    optional: tuple[str, ...] = ()
    quiet: bool = False  # a run without its tables did not take that measurement at all: no note, no heading


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("logprob_dynamics", "Log-prob dynamics", (PAIRS.name,), logprob_dynamics,
               "Change of the chosen and rejected log-probs of the probe pairs since their first measured step, and "
               "their margin; with pair groups (the built-in task's pair kinds), the mean of each group, also in the "
               "table below. Both rising or both falling together is the pitfall (docs/theory.md §3).",
               optional=(COVARIATES.name,)),
    FigureSpec("gradient_statistics", "Gradient statistics", (PAIRS.name,), gradient_statistics,
               "Squared gradient norms, their inner product, and the entanglement ratio ρ; ρ > 1 means one of "
               "the two log-probs moves the wrong way under a DPO step (docs/theory.md §3)."),
    FigureSpec("regime_plane", "The regime plane", (PAIRS.name,), regime_plane,
               "Each pair at each step by gradient cosine and norm ratio; the curves are the analytic "
               "boundaries of the chosen-falls and rejected-rises regions (docs/theory.md §3)."),
    FigureSpec("regime_shares", "Regime shares", (SUMMARY.name,), regime_shares,
               "Share of probe pairs in each regime, per pair alone (docs/theory.md §3) and within the minibatch "
               "step (§4)."),
    FigureSpec("layer_breakdown", "Layer breakdown", (LAYERS.name,), layer_breakdown,
               "Which layers carry the inner product ⟨g_w, g_l⟩ summed over the probe pairs, in % of each step's "
               "total, over steps (docs/theory.md §4)."),
    FigureSpec("prediction_check", "Predicted vs observed", (UPDATES.name,), prediction_check,
               "The first-order prediction of each log-prob change against the change observed after the "
               "step: the toolkit checking itself (docs/theory.md §5). Sign agreement counts the sequences that "
               "moved above the noise floor 10⁻⁶ · max(1, |log-prob|)."),
    FigureSpec("shared_content", "Entanglement and shared content", (PAIRS.name, COVARIATES.name), shared_content,
               "How much the chosen and rejected responses share (token overlap, or the pair kind of the "
               "built-in task) against their gradient cosine: pairs that share more are more entangled "
               "(docs/theory.md §7)."),
    FigureSpec("ranking_accuracy", "Ranking accuracy", (SUMMARY.name,), ranking_accuracy,
               "Share of probe pairs ranked right (chosen above rejected) by the policy, by its DPO implicit reward "
               "(log-probs minus the reference's; a tie counts one half, so it is 50% while the policy still equals "
               "its reference) and by the reference (dashed, drawn over the policy's line); with a per-pair "
               "preference probability, also the idealized accuracy of the DPO optimum and the gap to it "
               "(docs/theory.md §8)."),
    FigureSpec("token_heatmap", "Token maps", (TOKENS.name,), token_heatmaps,
               "Cosine between the per-token gradients of the chosen (rows) and rejected (columns) response "
               "tokens of one probe pair (red: aligned, blue: opposed). Summed over the cells, the inner products "
               "give the pair's ⟨g_w, g_l⟩: the tokens whose gradients align are where the entanglement comes "
               "from (docs/theory.md §7).", many=True),
    FigureSpec("dataset_entanglement", "Which training pairs are entangled", (TRAIN_PAIRS.name,),
               dataset_entanglement,
               "Each row of the training dataset measured inside the trainer's own pass, by its gradient cosine "
               "averaged over the steps it was trained on (the entanglement score), coloured by its latest regime; "
               "right, the same scores ranked: the cut-off of entangle filter --drop-top. The most entangled rows "
               "are in the table above.", quiet=True),
)
