"""The run directory's schema: validation on write, and the torch-free modules that read runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from entangle.schema import PAIRS, REGIMES, SUMMARY, TABLES, group_column, validate


def _layers(**change) -> pd.DataFrame:
    frame = pd.DataFrame({"step": [0, 0], "pair": [0, 1], "layer": ["embed", "head"], "inner": [1.0, -2.0],
                          "norm2_chosen": [2.0, 3.0], "norm2_rejected": [4.0, 5.0], "cosine": [0.35, -0.5]})
    return frame.assign(**change)


def test_every_table_the_toolkit_writes_is_stated():
    assert set(TABLES) == {"pairs", "summary", "summary_adam", "layers", "updates", "tokens", "covariates",
                           "train_pairs", "train_summary", "pairs_text"}
    for table in TABLES.values():
        assert set(table.keys) <= set(table.columns), table.name
        assert set(table.columns.values()) | set(table.optional.values()) <= {"int", "float", "bool", "str"}
    assert {f"share_{r}" for r in REGIMES} <= set(SUMMARY.columns) and PAIRS.dtype_of("regime") == "str"


def test_validate_names_the_table_and_the_column():
    validate("layers", _layers())
    validate("layers", _layers(inner=[1, 2]))                     # an integer is a real number
    validate("layers", _layers().iloc[:0])                         # empty: no dtypes to check
    validate("mine", pd.DataFrame({"anything": ["goes"]}))        # a user's own table
    with pytest.raises(ValueError, match=r"table 'layers' lacks required column\(s\) \['layer', 'cosine'\]"):
        validate("layers", _layers().drop(columns=["layer", "cosine"]))
    with pytest.raises(ValueError, match=r"table 'layers': column 'inner' is bool, expected float"):
        validate("layers", _layers(inner=[True, False]))
    with pytest.raises(ValueError, match=r"column 'pair' is float64, expected int"):
        validate("layers", _layers(pair=[0.0, np.nan]))
    with pytest.raises(ValueError, match=r"table 'covariates': column 'kind' is float64, expected str"):
        validate("covariates", pd.DataFrame({"pair": [0], "shared_prefix_len": [1], "edit_distance": [2],
                                             "jaccard": [0.5], "len_chosen": [3], "len_rejected": [4],
                                             "kind": [1.5]}))


def test_group_column_is_found_in_either_frame():
    assert group_column(pd.DataFrame({"pair": [0]}), pd.DataFrame({"pair": [0], "kind": ["a"]})) == "kind"
    assert group_column(pd.DataFrame({"group": ["x"]})) == "group"
    assert group_column(pd.DataFrame({"pair": [0]})) is None


@pytest.mark.parametrize("module", ["entangle.report", "entangle.runio", "entangle.schema",
                                    "entangle.metrics.summary", "entangle.metrics.agreement", "entangle.filtering"])
def test_reading_runs_loads_no_torch(module):
    code = f"import {module}, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
