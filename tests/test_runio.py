import numpy as np
import pandas as pd
import pytest

from entangle.runio import RunWriter, read_run, read_table


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_parts_are_appended_and_read_back_in_step_order(tmp_path, fmt):
    w = RunWriter(tmp_path / "run", fmt=fmt)
    w.write("mine", pd.DataFrame({"step": [10, 10], "pair": [0, 1], "x": [1.0, 2.0]}), step=10)   # a user's table
    w.write("mine", pd.DataFrame({"step": [2, 2], "pair": [0, 1], "x": [3.0, 4.0]}), step=2)
    w.write_manifest({"objective": "sigmoid"})
    w.write_manifest({"beta": 0.1})
    assert w.steps("mine") == [2, 10]
    got = read_table(tmp_path / "run", "mine")
    assert got["step"].tolist() == [2, 2, 10, 10] and got["x"].tolist() == [3.0, 4.0, 1.0, 2.0]
    run = read_run(tmp_path / "run")
    assert run["manifest"] == {"objective": "sigmoid", "beta": 0.1}
    assert list(run) == ["manifest", "mine"]
    assert not list((tmp_path / "run" / "mine").glob("*.tmp"))


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_run(tmp_path / "nope")


def _updates(**change) -> pd.DataFrame:
    frame = pd.DataFrame({"step": [3, 3], "seq": [0, 1], "pair": [0, 0], "side": ["chosen", "rejected"],
                          "logp_before": [-5.0, -7.0], "logp_after": [-4.9, -7.2], "observed": [0.1, -0.2],
                          "pred_update": [0.09, -0.21], "pred_gradient": [np.nan, np.nan]})
    return frame.assign(**change)


def test_a_table_of_the_schema_is_validated_on_write(tmp_path):
    w = RunWriter(tmp_path / "run")
    w.write("updates", _updates(), step=3)                         # complete: written
    with pytest.raises(ValueError, match=r"table 'updates' lacks required column\(s\) \['observed'\]"):
        w.write("updates", _updates().drop(columns="observed"), step=4)
    with pytest.raises(ValueError, match=r"table 'updates': column 'side' is float64, expected str"):
        w.write("updates", _updates(side=[0.0, 1.0]), step=5)
    with pytest.raises(ValueError, match=r"column 'step' is float64, expected int"):
        w.write("updates", _updates(step=3.0), step=6)
    assert w.steps("updates") == [3]                              # nothing half-written by the failed writes
