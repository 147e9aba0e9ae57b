"""One self-contained HTML report of a run directory: figures (embedded as base64 PNG), a summary table, verdicts.

:func:`make_report` reads the run with :func:`entangle.runio.read_run`, draws every figure of
:data:`entangle.report.figures.FIGURES` whose tables are present (noting the ones it skips), writes each as PNG
(and any other requested format) and ``report.html`` beside them. Every number in the summary table is the
``summary`` table's value, shown to 4 significant digits, with the exact value in the cell's ``data-value``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from entangle.metrics.pairs import summarize
from entangle.report.figures import FIGURES, FigureSpec
from entangle.report.verdict import Verdict, verdicts

# (summary column, header) of the HTML summary table, in order
SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("step", "step"),
    ("n_pairs", "pairs"),
    ("share_ideal", "share ideal"),
    ("share_both_rise", "share both rise"),
    ("share_both_fall", "share both fall"),
    ("share_chosen_falls_rejected_rises", "share chosen ↓ rejected ↑"),
    ("cosine_q50", "median cosine"),
    ("ratio_q50", "median ratio ρ"),
    ("ranking_accuracy", "ranking accuracy"),
    ("ranking_accuracy_ref_adjusted", "ranking accuracy, ref-adjusted"),
    ("ref_ranking_accuracy", "reference ranking accuracy"),
    ("idealized_ranking_accuracy", "idealized ranking accuracy"),
    ("ranking_accuracy_gap", "ranking accuracy gap"),
)
TABLES_NEEDED = ("pairs", "summary")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f4f4f4; } td.key, th.key { text-align: left; }
.scroll { max-height: 28em; overflow-y: auto; display: inline-block; border: 1px solid #e4e4e4; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.92em; }
.note { color: #8a5a00; background: #fff7e6; padding: 0.4em 0.8em; border-left: 3px solid #e0a030; }
ul.verdicts li { margin-bottom: 0.5em; }
"""


@dataclass
class DrawnFigure:
    """A figure of the report: its spec, PNG bytes (None when skipped), files written and a note."""

    spec: FigureSpec
    png: bytes | None
    files: list[Path]
    note: str = ""


def _present(tables: dict[str, Any], name: str) -> bool:
    frame = tables.get(name)
    return isinstance(frame, pd.DataFrame) and not frame.empty


def draw_figures(
    tables: dict[str, pd.DataFrame],
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("png",),
    dpi: int = 110,
) -> list[DrawnFigure]:
    """Draw every figure of ``FIGURES`` whose tables are present, saving ``<name>.<fmt>`` in ``out_dir``.

    A figure whose table is missing or empty, or whose table lacks a column it needs, is skipped with a note.
    """
    out = Path(out_dir)
    drawn = []
    for spec in FIGURES:
        missing = [t for t in spec.tables if not _present(tables, t)]
        if missing:
            drawn.append(DrawnFigure(spec, None, [], f"skipped: the run has no {' or '.join(missing)} table"
                                     + (" (a checkpoint analysis records no updates)" if "updates" in missing else "")))
            continue
        try:
            result = spec.draw(*(tables[t] for t in spec.tables))
        except (KeyError, ValueError) as err:
            warnings.warn(f"figure {spec.name!r} not drawn: {err!r}", stacklevel=2)
            drawn.append(DrawnFigure(spec, None, [], f"skipped: could not draw it from the tables ({err!r})"))
            continue
        # a spec with ``many`` gives (file suffix, label, Figure) per figure: each becomes its own entry
        items = ([(f"{spec.name}_{suffix}", f"{spec.title}: {label}", fig) for suffix, label, fig in result]
                 if spec.many else [(spec.name, spec.title, result)])
        for name, title, fig in items:
            sub = spec if not spec.many else replace(spec, name=name, title=title, many=False)
            drawn.append(_save(sub, fig, out, formats, dpi))
    return drawn


def _save(spec: FigureSpec, fig, out: Path, formats: Sequence[str], dpi: int) -> DrawnFigure:
    """Write ``fig`` as ``<spec.name>.<fmt>`` for each format; close it; return its entry."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    files = []
    for fmt in formats:
        path = out / f"{spec.name}.{fmt}"
        if fmt == "png":
            path.write_bytes(buffer.getvalue())
        else:
            fig.savefig(path, format=fmt, dpi=dpi)
        files.append(path)
    plt.close(fig)
    return DrawnFigure(spec, buffer.getvalue(), files)


def _cell(value: Any, column: str) -> str:
    """A ``<td>`` showing ``value`` to 4 significant digits, with its exact value in ``data-value``."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        shown, exact = "–", "nan"
    elif isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and float(value).is_integer()
                                                  and column in ("step", "n_pairs", "n_excluded")):
        shown = exact = str(int(value))
    else:
        shown, exact = f"{float(value):.4g}", repr(float(value))
    return f'<td data-column="{html.escape(column)}" data-value="{exact}">{shown}</td>'


def summary_table(summary: pd.DataFrame) -> str:
    """The HTML ``<table id="summary">``: one row per step of the columns in :data:`SUMMARY_COLUMNS` present.

    The column of the regime the per-pair view cannot produce (chosen ↓ rejected ↑) is shown only when non-zero.
    """
    cols = [(c, h) for c, h in SUMMARY_COLUMNS if c in summary
            and (c != "share_chosen_falls_rejected_rises" or summary[c].fillna(0).gt(0).any())]
    head = "".join(f'<th data-column="{c}">{html.escape(h)}</th>' for c, h in cols)
    rows = []
    for _, row in summary.sort_values("step").iterrows() if "step" in summary else summary.iterrows():
        rows.append("<tr>" + "".join(_cell(row[c], c) for c, _ in cols) + "</tr>")
    return f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _manifest_table(manifest: dict[str, Any]) -> str:
    if not manifest:
        return "<p>No manifest.json in the run directory.</p>"
    rows = []
    for key, value in manifest.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        text = text if len(text) <= 160 else text[:157] + "…"
        rows.append(f'<tr><td class="key">{html.escape(str(key))}</td><td class="key">{html.escape(text)}</td></tr>')
    return f'<table id="manifest">{"".join(rows)}</table>'


def _verdict_list(items: list[Verdict]) -> str:
    if not items:
        return '<p class="note">No verdicts: the run has no pairs table.</p>'
    lis = "".join(f'<li data-start="{v.start}" data-end="{v.end}">{html.escape(v.text)}</li>' for v in items)
    return f'<ul class="verdicts" id="verdicts">{lis}</ul>'


def _figure_html(f: DrawnFigure, number: int) -> str:
    title = f"{number}. {html.escape(f.spec.title)}"
    if f.png is None:
        return (f'<h3 id="fig-{f.spec.name}">{title}</h3>'
                f'<p class="note" data-figure="{f.spec.name}">{html.escape(f.note)}</p>')
    data = base64.b64encode(f.png).decode("ascii")
    return (f'<figure id="fig-{f.spec.name}"><h3>{title}</h3>'
            f'<img alt="{html.escape(f.spec.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(f.spec.caption)}</figcaption></figure>")


def render_html(
    title: str,
    manifest: dict[str, Any],
    summary: pd.DataFrame | None,
    figures: list[DrawnFigure],
    items: list[Verdict],
    notes: Sequence[str] = (),
) -> str:
    """The report page as one string (no external resources)."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts.append("<h2>Verdicts</h2><p>Per step range, from the first-order prediction of one plain gradient step "
                 "for each probe pair alone (THEORY.md §3); shares are over all (pair, step) rows of the range.</p>")
    parts.append(_verdict_list(items))
    parts.append("<h2>Summary per step</h2>")
    parts.append(f'<div class="scroll">{summary_table(summary)}</div>' if summary is not None and not summary.empty
                 else '<p class="note">No summary: the run has no summary or pairs table.</p>')
    parts.append("<h2>Figures</h2>")
    parts += [_figure_html(f, i) for i, f in enumerate(figures, start=1)]
    parts.append(f"<h2>Run</h2>{_manifest_table(manifest)}</body></html>")
    return "\n".join(parts)


def make_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    formats: Sequence[str] = ("png",),
) -> Path:
    """Write the figures and one self-contained ``report.html`` for a run directory; return the HTML's path.

    Args:
        run_dir: a run directory (see :mod:`entangle.runio`) with at least a ``pairs`` or ``summary`` table.
        out_dir: where to write; default ``RUN_DIR/report``.
        formats: file formats of the figures beside the HTML (``"png"``, ``"pdf"``, ``"svg"``).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: it holds neither a ``pairs`` nor a ``summary`` table.
    """
    from entangle.runio import read_run

    run_dir = Path(run_dir)
    tables = read_run(run_dir)
    if not any(_present(tables, t) for t in TABLES_NEEDED):
        found = sorted(k for k in tables if k != "manifest" and _present(tables, k))
        raise ValueError(f"no pairs or summary table in {str(run_dir)!r} (found: {', '.join(found) or 'nothing'}); "
                         "is it a run directory written by entangle?")
    notes = []
    if not _present(tables, "summary"):
        tables["summary"] = summarize(tables["pairs"])
        notes.append("The run has no summary table: the summary was computed from the pairs table.")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(tables, out, formats)
    items = verdicts(tables["pairs"], tables.get("layers"), tables.get("updates")) if _present(tables, "pairs") else []
    manifest = tables["manifest"]
    title = f"entangle report: {manifest.get('name') or run_dir.resolve().name}"
    path = out / "report.html"
    path.write_text(render_html(title, manifest, tables["summary"], figures, items, notes), encoding="utf-8")
    return path
