import pandas as pd
import pytest

from entangle.runio import RunWriter, read_run, read_table


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_parts_are_appended_and_read_back_in_step_order(tmp_path, fmt):
    w = RunWriter(tmp_path / "run", fmt=fmt)
    w.write("pairs", pd.DataFrame({"step": [10, 10], "pair": [0, 1], "x": [1.0, 2.0]}), step=10)
    w.write("pairs", pd.DataFrame({"step": [2, 2], "pair": [0, 1], "x": [3.0, 4.0]}), step=2)
    w.write_manifest({"objective": "sigmoid"})
    w.write_manifest({"beta": 0.1})
    assert w.steps("pairs") == [2, 10]
    got = read_table(tmp_path / "run", "pairs")
    assert got["step"].tolist() == [2, 2, 10, 10] and got["x"].tolist() == [3.0, 4.0, 1.0, 2.0]
    run = read_run(tmp_path / "run")
    assert run["manifest"] == {"objective": "sigmoid", "beta": 0.1}
    assert list(run) == ["manifest", "pairs"]
    assert not list((tmp_path / "run" / "pairs").glob("*.tmp"))


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_run(tmp_path / "nope")
