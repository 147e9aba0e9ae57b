"""Plain-language verdicts per step range, computed from the tidy tables.

Steps are grouped into ranges where the dominant per-pair regime stays the same (or, when that gives too many
ranges, into equal chunks of steps). For each range a :class:`Verdict` holds the numbers — shares over all
(pair, step) rows in the range, the median entanglement ratio of the pairs moving the wrong way, the layers that
carry most of their inner product, and what was observed after the step — and a sentence built from them, e.g.

    steps 40–120: chosen log-prob falls for 63% of probe pairs; their median entanglement ratio is 1.8;
    the inner product sits mostly in layers 10–12 (71%).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from entangle.report.figures import layer_order
from entangle.schema import REGIMES

WRONG_CHOSEN = ("both_fall", "chosen_falls_rejected_rises")    # regimes where the chosen log-prob falls
WRONG_REJECTED = ("both_rise", "chosen_falls_rejected_rises")  # regimes where the rejected log-prob rises


@dataclass
class Verdict:
    """What happened in one range of steps (shares are fractions of the (pair, step) rows with a regime).

    Attributes:
        start, end: first and last measured step of the range; steps: the measured steps in it.
        n_rows: (pair, step) rows with a regime; dominant: the most common regime.
        shares: regime -> share; chosen_falls, rejected_rises: share whose chosen falls / rejected rises.
        median_ratio: median entanglement ratio of the affected pairs (chosen falls or rejected rises),
            or of all pairs when none is affected (``ratio_of`` says which).
        layers: the fewest layers carrying at least half of the summed inner product of those pairs (model order),
            layer_share: the share they carry; None/NaN without a layer table or with a non-positive sum.
        batch_chosen_falls, batch_rejected_rises: the same shares under the whole minibatch step (docs/theory.md §4,
            ``batch_chosen_rises``/``batch_rejected_falls`` columns), NaN without them.
        observed_chosen_falls, observed_rejected_rises: share of probe sequences whose log-prob was seen to
            fall / rise after the step (``updates`` table), NaN without one.
        text: the sentence.
    """

    start: int
    end: int
    steps: list[int]
    n_rows: int
    dominant: str
    shares: dict[str, float]
    chosen_falls: float
    rejected_rises: float
    median_ratio: float
    ratio_of: str
    layers: list[str] | None = None
    layer_share: float = float("nan")
    batch_chosen_falls: float = float("nan")
    batch_rejected_rises: float = float("nan")
    observed_chosen_falls: float = float("nan")
    observed_rejected_rises: float = float("nan")
    text: str = field(default="")


def dominant_regimes(pairs: pd.DataFrame) -> pd.Series:
    """Most common per-pair regime at each step (ties go to the earlier name in ``REGIMES``), indexed by step."""
    f = pairs.dropna(subset=["regime"])
    counts = f.groupby("step")["regime"].value_counts().unstack(fill_value=0)
    counts = counts.reindex(columns=[r for r in REGIMES if r in counts.columns])
    return counts.idxmax(axis=1)


def step_ranges(pairs: pd.DataFrame, max_ranges: int = 6, chunks: int | None = None) -> list[list[int]]:
    """Consecutive measured steps grouped where the dominant regime is constant.

    If that gives more than ``max_ranges`` ranges (a regime that flickers), the steps are cut into
    ``max_ranges`` equal chunks instead; if it gives one range of at least 6 steps, into 3 chunks, so that a
    trend within one regime still shows. ``chunks`` forces that many equal chunks.
    """
    dom = dominant_regimes(pairs)
    steps = dom.index.to_numpy()
    if chunks is None:
        ranges: list[list[int]] = []
        previous = None
        for step, regime in dom.items():
            if regime != previous:
                ranges.append([])
                previous = regime
            ranges[-1].append(int(step))
        if len(ranges) > max_ranges:
            chunks = max_ranges
        elif len(ranges) == 1 and len(steps) >= 6:
            chunks = 3
        else:
            return ranges
    return [[int(x) for x in c] for c in np.array_split(steps, max(1, chunks)) if len(c)]


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def _span(steps: list[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"


def layer_phrase(layers: list[str]) -> str:
    """``["layer 10", "layer 11", "layer 12"]`` -> ``"layers 10–12"``; other names are listed."""
    def number(name: str) -> int | None:
        tail = name.split()[-1]
        return int(tail) if name.startswith("layer ") and tail.isdigit() else None

    ordered = layer_order(layers)
    numbered = [n for n in (number(x) for x in ordered) if n is not None]
    parts = []
    for name in ordered:
        if number(name) is None:
            parts.append({"embed": "the embedding", "head": "the head"}.get(name, name))
        elif number(name) == numbered[0]:
            if len(numbered) == 1:
                parts.append(f"layer {numbered[0]}")
            elif numbered == list(range(numbered[0], numbered[-1] + 1)):
                parts.append(f"layers {numbered[0]}–{numbered[-1]}")
            else:
                parts.append("layers " + ", ".join(map(str, numbered)))
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def top_layers(layers: pd.DataFrame, max_layers: int = 3) -> tuple[list[str] | None, float]:
    """The fewest layers (at most ``max_layers``) whose summed inner product reaches half the total, and their share.

    ``(None, nan)`` when the total is not positive (no layer story to tell).
    """
    sums = layers.groupby("layer")["inner"].sum()
    total = float(sums.sum())
    if not len(sums) or not total > 0:
        return None, float("nan")
    ranked = sums.sort_values(ascending=False)
    cumulative = ranked.cumsum() / total
    k = min(int(np.searchsorted(cumulative.to_numpy(), 0.5) + 1), max_layers, len(ranked))
    chosen = list(ranked.index[:k])
    return layer_order(chosen), float(cumulative.iloc[k - 1])


def _observed(updates: pd.DataFrame | None, steps: list[int]) -> tuple[float, float]:
    if updates is None or updates.empty or "observed" not in updates:
        return float("nan"), float("nan")
    u = updates[updates["step"].isin(steps) & np.isfinite(updates["observed"].to_numpy(dtype=float))]
    falls = u.loc[u["side"] == "chosen", "observed"] < 0
    rises = u.loc[u["side"] == "rejected", "observed"] > 0
    return (float(falls.mean()) if len(falls) else float("nan"),
            float(rises.mean()) if len(rises) else float("nan"))


def verdict_for(
    pairs: pd.DataFrame,
    steps: list[int],
    layers: pd.DataFrame | None = None,
    updates: pd.DataFrame | None = None,
) -> Verdict:
    """The verdict of the rows of ``pairs`` (and ``layers``/``updates``) whose step is in ``steps``."""
    f = pairs[pairs["step"].isin(steps)].dropna(subset=["regime"])
    shares = {r: float((f["regime"] == r).mean()) if len(f) else float("nan") for r in REGIMES}
    chosen_falls = float(f["regime"].isin(WRONG_CHOSEN).mean()) if len(f) else float("nan")
    rejected_rises = float(f["regime"].isin(WRONG_REJECTED).mean()) if len(f) else float("nan")
    affected = f[f["regime"].isin(WRONG_CHOSEN + WRONG_REJECTED)]
    basis, ratio_of = (affected, "affected") if len(affected) else (f, "all")
    ratios = basis["ratio"].to_numpy(dtype=float)
    ratios = ratios[np.isfinite(ratios)]
    v = Verdict(
        start=steps[0], end=steps[-1], steps=list(steps), n_rows=len(f),
        dominant=max(REGIMES, key=lambda r: (shares[r], -REGIMES.index(r))) if len(f) else "none",
        shares=shares, chosen_falls=chosen_falls, rejected_rises=rejected_rises,
        median_ratio=float(np.median(ratios)) if len(ratios) else float("nan"), ratio_of=ratio_of,
    )
    if layers is not None and not layers.empty:
        keys = basis[["step", "pair"]].drop_duplicates()
        v.layers, v.layer_share = top_layers(layers.merge(keys, on=["step", "pair"]))
    if len(f) and {"batch_chosen_rises", "batch_rejected_falls"} <= set(f.columns):
        v.batch_chosen_falls = float((~f["batch_chosen_rises"].astype(bool)).mean())
        v.batch_rejected_rises = float((~f["batch_rejected_falls"].astype(bool)).mean())
    v.observed_chosen_falls, v.observed_rejected_rises = _observed(updates, steps)
    v.text = _sentence(v)
    return v


def _sentence(v: Verdict) -> str:
    if not v.n_rows:
        return f"{_span(v.steps)}: no pair has a predicted regime."
    head = f"{_span(v.steps)} (mostly {v.dominant.replace('_', ' ')}, {_percent(v.shares[v.dominant])}): "
    moves = []
    if v.chosen_falls > 0:
        moves.append(f"chosen log-prob falls for {_percent(v.chosen_falls)} of probe pairs")
    if v.rejected_rises > 0:
        moves.append(f"rejected log-prob rises for {_percent(v.rejected_rises)}" + ("" if moves else " of probe pairs"))
    if moves:
        text = head + " and ".join(moves) + f"; their median entanglement ratio is {v.median_ratio:.2f}"
    else:
        text = head + "chosen rises and rejected falls for every probe pair (ideal)"
        text += f"; the median entanglement ratio is {v.median_ratio:.2f}, below the threshold 1"
    if v.layers:
        text += f"; the inner product sits mostly in {layer_phrase(v.layers)} ({_percent(v.layer_share)})"
    text += _both("; within the minibatch step, chosen falls for {} and rejected rises for {}",
                  v.batch_chosen_falls, v.batch_rejected_rises)
    text += _both("; observed after the update: chosen fell for {} and rejected rose for {}",
                  v.observed_chosen_falls, v.observed_rejected_rises)
    return text + "."


def _both(template: str, chosen: float, rejected: float) -> str:
    """``template`` filled with two percentages, or "" when they are unknown."""
    if not (np.isfinite(chosen) and np.isfinite(rejected)):
        return ""
    return template.format(_percent(chosen), _percent(rejected))


def verdicts(
    pairs: pd.DataFrame,
    layers: pd.DataFrame | None = None,
    updates: pd.DataFrame | None = None,
    max_ranges: int = 6,
) -> list[Verdict]:
    """One :class:`Verdict` per step range of :func:`step_ranges`, in step order."""
    return [verdict_for(pairs, steps, layers, updates) for steps in step_ranges(pairs, max_ranges)]


__all__ = ["Verdict", "dominant_regimes", "layer_phrase", "step_ranges", "top_layers", "verdict_for", "verdicts"]
