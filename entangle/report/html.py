"""One self-contained HTML report of a run directory: figures (embedded as base64 PNG), a summary table, verdicts.

:func:`make_report` reads the run with :func:`entangle.runio.read_run`, draws every figure of
:data:`entangle.report.figures.FIGURES` whose tables are present (noting the ones it skips), writes each as PNG
(and any other requested format) and ``report.html`` beside them. Every number in the summary table is the
``summary`` table's value, shown to 3 significant digits, with the exact value in the cell's ``data-value``; with
pair groups, a second table gives each group's log-prob changes, the numbers the log-prob dynamics figure draws.
With a ``train_pairs`` table, a third gives the most entangled training pairs with their text, the rows of the
dataset view (:func:`entangle.metrics.dataset.dataset_view`) the dataset figure draws.
Table and column names come from :mod:`entangle.schema`; nothing here needs torch.
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

from entangle.metrics.dataset import TEXT_FIELDS, check_rows_cover, dataset_view, most_entangled
from entangle.metrics.summary import summarize
from entangle.report.figures import FIGURES, FigureSpec, group_dynamics, logprob_changes
from entangle.report.verdict import Verdict, verdicts
from entangle.schema import COVARIATES, LAYERS, PAIRS, PAIRS_TEXT, SUMMARY, TRAIN_PAIRS, UPDATES

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
TABLES_NEEDED = (PAIRS.name, SUMMARY.name, TRAIN_PAIRS.name)
SIGNIFICANT = 3      # significant digits of every non-integer number shown in a table

# (group table column, header) of the per-group table, in order
GROUP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("group", "pair group"),
    ("n", "pairs"),
    ("jaccard", "token overlap (median Jaccard)"),
    ("chosen", "mean Δ log π(chosen) (nats)"),
    ("rejected", "mean Δ log π(rejected) (nats)"),
    ("margin", "mean margin (nats)"),
    ("chosen_fell", "share with chosen fallen"),
    ("cosine", "median cos(g_w, g_l)"),
)

# (dataset view column, header) of the table of the most entangled training pairs, in order, then their text
ENTANGLED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("index", "dataset row"),
    ("cosine_mean", "mean cos(g_w, g_l)"),
    ("cosine_latest", "latest cosine"),
    ("step_latest", "latest step"),
    ("regime_latest", "latest regime"),
    ("share_ideal", "share of steps ideal"),
    ("ratio_mean", "mean ratio ρ"),
    ("n_measured", "times measured"),
    ("n_excluded", "times excluded"),
)
MOST_ENTANGLED = 20     # rows of that table
TEXT_CHARS = 200        # characters of each text shown (the end of a longer one is cut, "…" marks it)

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
        if missing and spec.quiet:
            continue
        if missing:
            drawn.append(DrawnFigure(spec, None, [], f"skipped: the run has no {' or '.join(missing)} table"
                                     + (" (a checkpoint analysis records no updates)" if "updates" in missing else "")))
            continue
        optional = (tables[t] if _present(tables, t) else None for t in spec.optional)
        try:
            result = spec.draw(*(tables[t] for t in spec.tables), *optional)
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


def _cell(value: Any, column: str, integer: bool = False) -> str:
    """A ``<td>`` showing ``value`` (an ``integer`` column's as an integer, any other number to ``SIGNIFICANT``
    significant digits, trailing zeros kept: 1.00 beside 0.0312), with its exact value in ``data-value``."""
    if isinstance(value, str):
        return f'<td class="key" data-column="{html.escape(column)}">{html.escape(value)}</td>'
    if value is None or not np.isfinite(float(value)):
        shown, exact = "–", "nan"
    elif integer or isinstance(value, (int, np.integer)):
        shown = exact = str(int(value))
    else:
        shown, exact = f"{float(value):#.{SIGNIFICANT}g}".rstrip("."), repr(float(value))
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
        rows.append("<tr>" + "".join(_cell(row[c], c, SUMMARY.dtype_of(c) == "int") for c, _ in cols) + "</tr>")
    return f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def group_table(pairs: pd.DataFrame, covariates: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """Per pair group, at the last measured step: pairs, median token overlap (with covariates), the mean changes
    since the first step and margin that :func:`entangle.report.figures.group_dynamics` gives (the last points of
    the log-prob dynamics figure), the share of pairs whose chosen log-prob fell and the median cosine over all
    steps; None when the pairs have no group."""
    dynamics = group_dynamics(pairs, covariates)
    if dynamics is None:
        return None
    last = dynamics[dynamics["step"] == dynamics["step"].max()].set_index("group")
    changes = logprob_changes(pairs, covariates)
    final = changes[changes["step"] == changes["step"].max()]
    cosine = pairs.assign(group=changes["group"].reindex(pairs.index)).groupby("group")["cosine"].median()
    out = pd.DataFrame({
        "n": last["n"], "chosen": last["chosen"], "rejected": last["rejected"], "margin": last["margin"],
        "chosen_fell": (final["chosen"] < 0).groupby(final["group"]).mean(), "cosine": cosine,
    }).loc[last.index]
    if covariates is not None and "jaccard" in covariates:
        jaccard = covariates.drop_duplicates("pair").set_index("pair")["jaccard"]
        per_pair = final.assign(jaccard=final["pair"].map(jaccard))
        out.insert(1, "jaccard", per_pair.groupby("group")["jaccard"].median())
    return out.rename_axis("group").reset_index()


def _group_table_html(groups: pd.DataFrame) -> str:
    cols = [(c, h) for c, h in GROUP_COLUMNS if c in groups]
    head = "".join(f'<th data-column="{c}">{html.escape(h)}</th>' for c, h in cols)
    rows = ["<tr>" + "".join(_cell(row[c], c, c == "n") for c, _ in cols) + "</tr>" for _, row in groups.iterrows()]
    return f'<table id="groups"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def entangled_table(train_pairs: pd.DataFrame, texts: pd.DataFrame | None = None,
                    k: int = MOST_ENTANGLED) -> pd.DataFrame:
    """The ``k`` most entangled rows of the training dataset (:func:`entangle.metrics.dataset.most_entangled` of
    the dataset view of ``train_pairs``), with their ``prompt``, ``chosen`` and ``rejected`` text when ``texts``
    (a ``pairs_text`` frame) is given.

    Raises:
        ValueError: ``texts`` lacks a row the run measured.
    """
    view = dataset_view(train_pairs)
    top = most_entangled(view, k)[[c for c, _ in ENTANGLED_COLUMNS]] if len(view) else view
    if texts is None:
        return top
    check_rows_cover(view, len(texts), "the text of the training pairs")
    return top.merge(texts[["index", *TEXT_FIELDS]], on="index", how="left")


def _entangled_table_html(top: pd.DataFrame) -> str:
    cols = [(c, h) for c, h in ENTANGLED_COLUMNS] + [(f, f) for f in TEXT_FIELDS if f in top]
    head = "".join(f'<th data-column="{c}">{html.escape(h)}</th>' for c, h in cols)
    rows = []
    for _, row in top.iterrows():
        cells = [_cell(row[c], c, c in ("index", "step_latest", "n_measured", "n_excluded")) for c, _ in cols
                 if c not in TEXT_FIELDS]
        cells += [f'<td class="key text" data-column="{f}">{html.escape(_shorten(row[f]))}</td>'
                  for f in TEXT_FIELDS if f in top]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="most-entangled"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _shorten(text: Any) -> str:
    text = "" if not isinstance(text, str) else " ".join(text.split())
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"


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
    groups: pd.DataFrame | None = None,
    entangled: pd.DataFrame | None = None,
) -> str:
    """The report page as one string (no external resources); ``groups`` is :func:`group_table`'s frame,
    ``entangled`` :func:`entangled_table`'s."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts.append("<h2>Verdicts</h2><p>Per step range, from the first-order prediction of one plain gradient step "
                 "for each probe pair alone (docs/theory.md §3); shares are over all (pair, step) rows of the range.</p>")
    parts.append(_verdict_list(items))
    parts.append("<h2>Summary per step</h2>")
    parts.append(f'<div class="scroll">{summary_table(summary)}</div>' if summary is not None and not summary.empty
                 else '<p class="note">No summary: the run has no summary or pairs table.</p>')
    if groups is not None:
        parts.append("<h2>Pair groups</h2><p>Per pair group at the last measured step: log-prob changes since the "
                     "first measured step (the last points of the log-prob dynamics figure) and the margin, means "
                     "over the group's pairs; the cosine is the median over all steps.</p>")
        parts.append(_group_table_html(groups))
    if entangled is not None:
        parts.append(f"<h2>The most entangled training pairs</h2><p>The {MOST_ENTANGLED} rows of the training "
                     "dataset with the highest gradient cosine cos(g_w, g_l) averaged over the steps they were "
                     "measured at, inside the trainer's own pass (the dataset figure's scores); the regime is that "
                     "of the latest measurement. <code>entangle filter RUN --data DATA --out FILE --drop-top "
                     "FRACTION</code> writes the dataset without the most entangled rows.</p>")
        if not any(f in entangled for f in TEXT_FIELDS):
            parts.append('<p class="note">No text: pass the training dataset (entangle report RUN --data DATA, '
                         'make_report(..., texts=...)) or write a pairs_text table to the run directory.</p>')
        parts.append(f'<div class="scroll">{_entangled_table_html(entangled)}</div>')
    parts.append("<h2>Figures</h2>")
    parts += [_figure_html(f, i) for i, f in enumerate(figures, start=1)]
    parts.append(f"<h2>Run</h2>{_manifest_table(manifest)}</body></html>")
    return "\n".join(parts)


def make_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    formats: Sequence[str] = ("png",),
    texts: pd.DataFrame | None = None,
) -> Path:
    """Write the figures and one self-contained ``report.html`` for a run directory; return the HTML's path.

    Args:
        run_dir: a run directory (see :mod:`entangle.runio`) with at least a ``pairs``, ``summary`` or
            ``train_pairs`` table.
        out_dir: where to write; default ``RUN_DIR/report``.
        formats: file formats of the figures beside the HTML (``"png"``, ``"pdf"``, ``"svg"``).
        texts: the text of the training pairs (a ``pairs_text`` frame, e.g.
            ``entangle.metrics.dataset.pair_texts(rows)``), shown beside the most entangled ones; default: the
            run's ``pairs_text`` table, if any.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: it holds none of those tables; ``texts`` lacks a dataset row the run measured.
    """
    from entangle.runio import read_run

    run_dir = Path(run_dir)
    tables = read_run(run_dir)
    if not any(_present(tables, t) for t in TABLES_NEEDED):
        found = sorted(k for k in tables if k != "manifest" and _present(tables, k))
        raise ValueError(f"no pairs or summary table in {str(run_dir)!r}, nor train_pairs (found: "
                         f"{', '.join(found) or 'nothing'}); is it a run directory written by entangle?")
    notes = []
    if not _present(tables, SUMMARY.name) and _present(tables, PAIRS.name):
        tables[SUMMARY.name] = summarize(tables[PAIRS.name])
        notes.append("The run has no summary table: the summary was computed from the pairs table.")
    if texts is None and _present(tables, PAIRS_TEXT.name):
        texts = tables[PAIRS_TEXT.name]
    entangled = entangled_table(tables[TRAIN_PAIRS.name], texts) if _present(tables, TRAIN_PAIRS.name) else None
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(tables, out, formats)
    items = (verdicts(tables[PAIRS.name], tables.get(LAYERS.name), tables.get(UPDATES.name))
             if _present(tables, PAIRS.name) else [])
    covariates = tables[COVARIATES.name] if _present(tables, COVARIATES.name) else None
    groups = group_table(tables[PAIRS.name], covariates) if _present(tables, PAIRS.name) else None
    manifest = tables["manifest"]
    path = out / "report.html"
    path.write_text(render_html(report_title(manifest, run_dir), manifest, tables.get(SUMMARY.name), figures, items,
                                notes, groups, entangled), encoding="utf-8")
    return path


# objective names of ``entangle.metrics.objectives`` and the method each is the loss of
_METHODS = {"sigmoid": "DPO", "ipo": "IPO", "hinge": "SLiC", "robust": "robust DPO", "simpo": "SimPO",
            "orpo": "ORPO", "rdpo": "R-DPO", "dpop": "DPOP", "sigmoid_norm": "length-normalised DPO"}
_SYMBOLS = {"beta": "β"}


def report_title(manifest: dict[str, Any], run_dir: str | os.PathLike) -> str:
    """The page title from the manifest's objective, hyper-parameters and model, e.g. "DPO (sigmoid, β=0.1) on
    GPT2LMHeadModel — entanglement report"; the run directory's name only when the manifest names neither."""
    objective, model = manifest.get("objective"), manifest.get("model")
    if not objective and not model:
        return f"Entanglement report: {manifest.get('name') or Path(run_dir).resolve().name}"
    hyper = manifest.get("hyper") or {k: manifest[k] for k in ("beta",) if k in manifest}
    what = ""
    if objective:
        settings = ", ".join([str(objective)] + [f"{_SYMBOLS.get(k, k)}={v:g}" if isinstance(v, float)
                                                 else f"{_SYMBOLS.get(k, k)}={v}" for k, v in hyper.items()])
        what = f"{_METHODS.get(objective, objective)} ({settings})"
    name = Path(str(model)).name if model else ""
    on = f"{what} on {name}" if what and name else what or name       # an in-pass run's manifest names no objective
    return f"{on.strip()} — entanglement report"
