"""Every notebook in ``notebooks/`` runs top to bottom on the built-in default, so none of them can rot.

Each notebook is executed with nbclient in a fresh ``python3`` kernel whose working directory is a temporary
folder; the notebooks write their outputs under ``./notebook-out``, which this test then checks. Notebooks are
stored without outputs (the second test keeps it that way).
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the 'test' extra")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the 'test' extra")
pytest.importorskip("ipykernel", reason="ipykernel is in the 'test' extra")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell

# files each notebook must write under notebook-out/ (relative paths); notebooks not listed only have to run
EXPECTED = {
    "quickstart": ["quickstart/gram_matrix.png", "quickstart/regime_plane.png", "quickstart/token_heatmap.png",
                   "quickstart/overlap_vs_cosine.png", "quickstart/pairs.csv"],
    "training_walkthrough": [
        *(f"walkthrough/figures/{name}.png" for name in (
            "logprob_dynamics", "gradient_statistics", "regime_plane", "regime_shares", "layer_breakdown",
            "prediction_check", "shared_content")),
        "walkthrough/report-live/report.html", "walkthrough/report-checkpoints/report.html",
        "walkthrough/trainer/checkpoint-4/config.json", "walkthrough/trainer/checkpoint-12/config.json",
        "walkthrough/run/manifest.json", "walkthrough/checkpoints/manifest.json",
    ],
}


def _kernel_available() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager

    return "python3" in KernelSpecManager().find_kernel_specs()


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= set(EXPECTED), "a notebook listed in EXPECTED is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    if not _kernel_available():
        pytest.skip("no 'python3' Jupyter kernel installed (pip install ipykernel)")
    monkeypatch.delenv("ENTANGLE_NOTEBOOK_OUT", raising=False)   # outputs go to ./notebook-out of the kernel
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()   # raises CellExecutionError naming the cell on any error

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 3, f"{path.name} displayed only {images} figures inline"
    out = tmp_path / "notebook-out"
    for rel in EXPECTED.get(path.stem, []):
        f = out / rel
        assert f.is_file() and f.stat().st_size > 0, f"{path.name} did not write {rel}"
        if f.suffix == ".png":
            assert f.stat().st_size > 5000, f"{rel} looks empty"
    for html in out.rglob("report.html"):
        text = html.read_text(encoding="utf-8")
        assert 'id="summary"' in text and "data:image/png;base64," in text
