"""Report: figures, verdicts and a self-contained HTML page, all from the tidy tables of a run directory.

``report`` never imports ``capture``: everything here is a function of frames (``entangle.runio.read_run``).

- :func:`make_report` — ``make_report(run_dir, out_dir=None) -> Path`` of ``report.html`` (PNGs beside it);
- :mod:`entangle.report.figures` — one function per figure, each returning a matplotlib ``Figure``;
- :mod:`entangle.report.verdict` — plain-language verdicts per step range;
- :mod:`entangle.report.tokens` — token heatmaps of the ``tokens`` table (``Monitor.token_maps``).
"""

from entangle.report.figures import (
    FIGURES,
    FigureSpec,
    chosen_falls_boundary,
    gradient_statistics,
    layer_breakdown,
    logprob_dynamics,
    plane_regime,
    prediction_check,
    ranking_accuracy,
    regime_plane,
    regime_shares,
    rejected_rises_boundary,
)
from entangle.report.html import make_report
from entangle.report.tokens import token_heatmap, token_heatmaps
from entangle.report.verdict import Verdict, step_ranges, verdicts

__all__ = [
    "FIGURES",
    "FigureSpec",
    "Verdict",
    "chosen_falls_boundary",
    "gradient_statistics",
    "layer_breakdown",
    "logprob_dynamics",
    "make_report",
    "plane_regime",
    "prediction_check",
    "ranking_accuracy",
    "regime_plane",
    "regime_shares",
    "rejected_rises_boundary",
    "step_ranges",
    "token_heatmap",
    "token_heatmaps",
    "verdicts",
]
