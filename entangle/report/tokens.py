"""Token heatmap of one pair: where the chosen-rejected gradient entanglement comes from (docs/theory.md §7).

A function of the tidy frame that ``entangle.capture.tokens.token_map`` returns; pandas, numpy and
matplotlib only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

_AXIS_LABELS = {"wl": ("chosen", "rejected"), "ww": ("chosen", "chosen"), "ll": ("rejected", "rejected")}


def _label(token: object) -> str:
    """A readable tick label: visible leading spaces, escaped newlines, at most 12 characters."""
    s = str(token).replace("\n", "\\n").replace("\t", "\\t")
    s = "␣" + s[1:] if s.startswith(" ") else s or "''"
    return s if len(s) <= 12 else s[:11] + "…"


def token_heatmap(
    frame: pd.DataFrame,
    pair: int = 0,
    block: str = "wl",
    value: str = "cosine",
    max_tokens: int = 80,
    title: str | None = None,
    label: str | None = None,
) -> Figure:
    """Heatmap of ``value`` between one pair's per-token gradients: rows = chosen tokens, columns = rejected tokens.

    Args:
        frame: a ``token_map`` frame (columns pair, block, t, u, token_w, token_u, inner, cosine).
        pair: which pair to draw.
        block: ``"wl"`` (chosen x rejected, default), ``"ww"`` or ``"ll"``.
        value: ``"cosine"`` (colour range fixed to [-1, 1]) or ``"inner"`` (symmetric around 0).
        max_tokens: draw at most this many tokens per side (the first ones); the title says when cut.
        title: figure title; by default names the pair, the block and the block's total inner product (and,
            for ``wl`` with the ``ww``/``ll`` blocks present, the pair's gradient cosine).
        label: a prefix of the default title (e.g. ``"most entangled"``).

    The colour map is diverging and centred at 0 (red = aligned gradients, blue = opposed).
    """
    if value not in ("cosine", "inner"):
        raise ValueError(f"value must be 'cosine' or 'inner', not {value!r}")
    sub = frame[(frame["pair"] == pair) & (frame["block"] == block)]
    if sub.empty:
        raise ValueError(f"no rows for pair {pair}, block {block!r} in the frame "
                         f"(pairs {sorted(frame['pair'].unique())[:10]}, blocks {sorted(frame['block'].unique())})")
    n_t, n_u = int(sub["t"].max()) + 1, int(sub["u"].max()) + 1
    grid = np.full((n_t, n_u), np.nan)
    grid[sub["t"].to_numpy(), sub["u"].to_numpy()] = sub[value].to_numpy(dtype=float)
    rows = sub.drop_duplicates("t").set_index("t")["token_w"].reindex(range(n_t))
    cols = sub.drop_duplicates("u").set_index("u")["token_u"].reindex(range(n_u))
    cut_t, cut_u = min(n_t, max_tokens), min(n_u, max_tokens)
    grid = grid[:cut_t, :cut_u]

    if value == "cosine":
        lim = 1.0
    else:
        finite = np.abs(grid[np.isfinite(grid)])
        lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)

    cell = 0.16
    fig = Figure(figsize=(min(max(5.0, 1.8 + cell * cut_u), 20), min(max(4.0, 1.9 + cell * cut_t), 20)),
                 layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    fontsize = 7 if max(cut_t, cut_u) <= 60 else 5
    ax.set_xticks(range(cut_u), [_label(x) for x in cols.iloc[:cut_u]], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(cut_t), [_label(x) for x in rows.iloc[:cut_t]], fontsize=fontsize)
    ax.tick_params(length=0)
    row_name, col_name = _AXIS_LABELS.get(block, ("row", "column"))
    ax.set_ylabel(f"{row_name} response tokens")
    ax.set_xlabel(f"{col_name} response tokens")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    what = "cosine of per-token gradients" if value == "cosine" else "inner product of per-token gradients"
    fig.colorbar(im, ax=ax, shrink=0.8, label=what)
    if title is None:
        total = float(sub["inner"].sum())
        title = f"pair {pair}, {row_name} × {col_name}" if not label else f"{label}: pair {pair}"
        title += f"\nΣ inner = {total:.3g}"
        cos = pair_cosine(frame, pair)
        if block == "wl" and np.isfinite(cos):
            title += f", cos(g_w, g_l) = {cos:.2f}"
        if (cut_t, cut_u) != (n_t, n_u):
            title += f"\n(first {cut_t} × {cut_u} of {n_t} × {n_u} tokens)"
    fig.suptitle(title, fontsize=9.5)
    return fig


def pair_cosine(frame: pd.DataFrame, pair: int) -> float:
    """cos(g_w, g_l) of one pair from its blocks: Σ wl / sqrt(Σ ww · Σ ll); NaN without all three blocks."""
    sums = frame.loc[frame["pair"] == pair].groupby("block")["inner"].sum()
    if not {"wl", "ww", "ll"} <= set(sums.index) or not (sums["ww"] > 0 and sums["ll"] > 0):
        return float("nan")
    return float(sums["wl"] / np.sqrt(sums["ww"] * sums["ll"]))


_WHICH_ORDER = {"most entangled": 0, "least entangled": 1}


def token_heatmaps(tokens: pd.DataFrame, max_tokens: int = 60) -> list[tuple[str, str, Figure]]:
    """The chosen × rejected cosine heatmap of every pair in a run's ``tokens`` table, at its latest step.

    Returns ``(file suffix, label, Figure)`` per pair, the most entangled first: the label is the ``which``
    column's value ("most entangled" / "least entangled") when the table has one, else ``"pair k"``.
    """
    f = tokens
    if "step" in f and f["step"].notna().any():
        f = f[f["step"] == f["step"].max()]
    if f.empty:
        raise ValueError("the tokens table has no rows")
    step = int(f["step"].iloc[0]) if "step" in f else None
    keys = f[["pair"] + (["which"] if "which" in f else [])].drop_duplicates("pair")
    if "which" in keys:
        keys = keys.assign(order=keys["which"].map(_WHICH_ORDER).fillna(len(_WHICH_ORDER))).sort_values(
            ["order", "pair"], kind="stable")
    out = []
    for _, key in keys.iterrows():
        pair = int(key["pair"])
        which = key.get("which")
        named = isinstance(which, str) and bool(which)
        label = which if named else f"pair {pair}"
        sub = f[f["pair"] == pair]
        method = sub["method"].iloc[0] if "method" in sub else None
        at = f"step {step}" if step is not None else ""
        prefix = f"{label} ({at})" if named and at else (label if named else at)
        if method == "head":
            prefix += ", output layer only"
        fig = token_heatmap(sub, pair=pair, block="wl", value="cosine", max_tokens=max_tokens, label=prefix)
        suffix = "_".join(label.split()) if which in _WHICH_ORDER else f"pair{pair}"
        out.append((suffix, label, fig))
    return out
