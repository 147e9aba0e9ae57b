"""The run directory: an append-only folder of tidy tables plus a JSON manifest.

Layout (each table is written in parts, one file per measured step, so writing never rewrites):

    RUN_DIR/manifest.json                 model, objective, hyper-parameters, probe hash, versions
    RUN_DIR/<table>/step-00000010.parquet (or .csv when pyarrow is absent)

The tables the toolkit writes (pairs, summary, summary_adam, layers, updates, tokens, covariates), what one row
of each is, their keys, columns and dtypes are stated once, in :mod:`entangle.schema`; :meth:`RunWriter.write`
checks every part against it (a table it does not name is the user's own and is written as it comes).

:func:`read_run` concatenates the parts of every table into one frame per table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from entangle.schema import validate


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


class RunWriter:
    """Writes tables of one run directory; safe to re-open (steps already written are kept)."""

    def __init__(self, out_dir: str | os.PathLike, fmt: str | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fmt = fmt or ("parquet" if _has_pyarrow() else "csv")

    def write(self, table: str, frame: pd.DataFrame, step: int) -> Path:
        """Write ``frame`` as the part of ``table`` for ``step`` (atomically: temp file, then rename).

        Raises:
            ValueError: ``table`` is one of :data:`entangle.schema.TABLES` and ``frame`` lacks one of its required
                columns or has a column of another dtype kind (the message names the table and the column).
        """
        validate(table, frame)
        folder = self.dir / table
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{int(step):08d}.{self.fmt}"
        tmp = path.with_suffix(path.suffix + ".tmp")
        if self.fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
        return path

    def steps(self, table: str) -> list[int]:
        """Steps already written for ``table``."""
        folder = self.dir / table
        if not folder.is_dir():
            return []
        return sorted(int(p.name.split("-")[1].split(".")[0]) for p in folder.glob("step-*.*")
                      if p.suffix in (".parquet", ".csv"))

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        """Merge ``manifest`` into ``manifest.json`` (keys already there are updated)."""
        path = self.dir / "manifest.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(manifest)
        path.write_text(json.dumps(old, indent=2, default=str))
        return path


def read_table(run_dir: str | os.PathLike, table: str) -> pd.DataFrame:
    """All parts of one table, in step order (empty frame if there is none)."""
    folder = Path(run_dir) / table
    parts = sorted(p for p in folder.glob("step-*.*") if p.suffix in (".parquet", ".csv")) if folder.is_dir() else []
    frames = [pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p) for p in parts]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``manifest.json`` as a dict (empty if there is none)."""
    path = Path(run_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Every table of a run directory as a frame, plus ``"manifest"``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    out: dict[str, Any] = {"manifest": read_manifest(run_dir)}
    for sub in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        out[sub.name] = read_table(run_dir, sub.name)
    return out
