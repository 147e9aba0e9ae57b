"""Every notebook in ``notebooks/`` runs top to bottom on the built-in default, so none of them can rot, and is
stored executed, with its outputs, so that a visitor of the repository sees its tables and figures.

``test_notebook_runs`` re-executes each notebook with nbclient in a fresh ``python3`` kernel whose working
directory is a temporary folder (the stored outputs play no part); the notebooks write their outputs under
``./notebook-out``, which the test then checks. ``test_notebook_is_stored_executed`` checks the stored copy: one
top-to-bottom run, no errors, figures inline, nothing specific to the machine that executed it.

After changing a notebook or the code it shows, store it executed again (the same kernel, environment and
checks as the test; nothing is written unless every check passes)::

    python tests/test_notebooks.py [NAME ...]      # default: every notebook
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the 'test' extra")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the 'test' extra")
pytest.importorskip("ipykernel", reason="ipykernel is in the 'test' extra")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell
# the kernel's environment: one thread (tiny models), no progress bars in the outputs, outputs under ./notebook-out;
# tqdm.auto without ipywidgets (not in the test extra) warns once, naming its file: not what a reader needs
KERNEL_ENV = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore:IProgress not found"}
KERNEL_ENV_UNSET = ("ENTANGLE_NOTEBOOK_OUT",)
MAX_STORED_BYTES = 2_000_000
# an absolute path of some machine in an output's text (image data is not searched: base64 holds '/')
ABSOLUTE_PATH = re.compile(r"(?<![\w./-])(?:/(?:tmp|home|root|work|Users|private|var/folders|mnt)/|[A-Za-z]:\\)")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

# files each notebook must write under notebook-out/ (relative paths); notebooks not listed only have to run
EXPECTED = {
    "quickstart": ["quickstart/gram_matrix.png", "quickstart/regime_plane.png", "quickstart/token_heatmap.png",
                   "quickstart/overlap_vs_cosine.png", "quickstart/pairs.csv"],
    "training_walkthrough": [
        *(f"walkthrough/figures/{name}.png" for name in (
            "logprob_dynamics", "gradient_statistics", "regime_plane", "regime_shares", "layer_breakdown",
            "prediction_check", "shared_content", "ranking_accuracy", "token_heatmap_most_entangled",
            "token_heatmap_least_entangled")),
        "walkthrough/report-live/report.html", "walkthrough/report-checkpoints/report.html",
        "walkthrough/trainer/checkpoint-4/config.json", "walkthrough/trainer/checkpoint-12/config.json",
        "walkthrough/run/manifest.json", "walkthrough/checkpoints/manifest.json",
    ],
    "compare": [*(f"compare/report/{name}.png" for name in (
        "compare_dynamics", "compare_margins", "compare_regimes", "compare_band", "compare_time")),
        "compare/report/compare.html", "compare/run/pairwise/manifest.json"],
}
# notebooks test_notebook_runs does not re-execute (their stored copy is still checked): compare trains five
# models, ~30 s in a fresh kernel on 2 cores; tests/test_compare.py runs the same code at a smaller size
NOT_RUN = {"compare"}


def _kernel_available() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager

    return "python3" in KernelSpecManager().find_kernel_specs()


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(nb))


def _texts(nb) -> list[str]:
    """The text of every output: streams, plain text and HTML (not image data)."""
    texts = []
    for o in _outputs(nb):
        if o.output_type == "stream":
            texts.append(o.text)
        texts += [o.get("data", {}).get(mime, "") for mime in ("text/plain", "text/html")]
    return texts


def execute(path: Path, workdir: Path):
    """Run the notebook at ``path`` top to bottom in a fresh ``python3`` kernel working in ``workdir`` (the
    caller sets :data:`KERNEL_ENV`); returns the executed notebook. Raises ``CellExecutionError`` naming the cell
    on any error."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT, record_timing=False,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def check_run(path: Path, nb, workdir: Path) -> None:
    """What one execution of a notebook must show: no error, at least three figures inline, its files written
    under ``workdir/notebook-out`` and its HTML reports complete."""
    errors = [o for o in _outputs(nb) if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
    images = _images(nb)
    assert images >= 3, f"{path.name} displayed only {images} figures inline"
    out = workdir / "notebook-out"
    for rel in EXPECTED.get(path.stem, []):
        f = out / rel
        assert f.is_file() and f.stat().st_size > 0, f"{path.name} did not write {rel}"
        if f.suffix == ".png":
            assert f.stat().st_size > 5000, f"{path.name}: {rel} looks empty"
    for html in out.rglob("report.html"):
        text = html.read_text(encoding="utf-8")
        assert 'id="summary"' in text and "data:image/png;base64," in text, f"{path.name}: {html} is incomplete"


def check_stored(path: Path, nb) -> None:
    """What a stored notebook must be: executed top to bottom in one kernel (execution counts 1, 2, ... in cell
    order), every code cell run, no errors, figures inline, no widget state, progress bar or absolute path."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}: store it executed top to bottom (python tests/test_notebooks.py)")
    errors = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and any(o.output_type == "error" for o in c.outputs)]
    assert not errors, f"{path.name}: cells {errors} stored with an error"
    assert _images(nb) >= 3, f"{path.name}: stored with only {_images(nb)} figures"
    widgets = any(WIDGET_MIME in o.get("data", {}) for o in _outputs(nb)) or "widgets" in nb.metadata
    assert not widgets, f"{path.name}: stored with widget state (progress bars); run with TQDM_DISABLE=1"
    noisy = [t[:80] for t in _texts(nb) if "\r" in t]
    assert not noisy, f"{path.name}: stored with progress-bar output {noisy}"
    paths = [m.group(0) + t[m.end():m.end() + 40] for t in _texts(nb) if (m := ABSOLUTE_PATH.search(t))]
    assert not paths, f"{path.name}: outputs hold absolute paths of the machine that ran it: {paths}"


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= set(EXPECTED), "a notebook listed in EXPECTED is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_executed(path):
    check_stored(path, nbformat.read(path, as_version=4))
    assert path.stat().st_size < MAX_STORED_BYTES, f"{path.name} is {path.stat().st_size} bytes"


def _executed_notebook():
    """A small notebook as a clean top-to-bottom run stores it: three code cells, each with a figure."""
    png = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    cells = [nbformat.v4.new_code_cell("plot()", execution_count=i, outputs=[png]) for i in (1, 2, 3)]
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# x"), *cells])


@pytest.mark.parametrize("spoil, message", [
    (lambda c: c.update(execution_count=None), "execution counts"),
    (lambda c: c.update(execution_count=7), "execution counts"),
    (lambda c: c.outputs.append(nbformat.v4.new_output("error", ename="E", evalue="x", traceback=[])), "an error"),
    (lambda c: c.update(outputs=[]), "only 2 figures"),
    (lambda c: c.outputs.append(nbformat.v4.new_output("stream", text=" 10%|#   \r 20%|##  ")), "progress-bar"),
    (lambda c: c.outputs.append(nbformat.v4.new_output("display_data", data={WIDGET_MIME: {}})), "widget"),
    (lambda c: c.outputs.append(nbformat.v4.new_output("stream", text="outputs in /tmp/pytest-3/out\n")),
     "absolute paths"),
    (lambda c: c.outputs.append(nbformat.v4.new_output("execute_result", execution_count=2,
                                                       data={"text/plain": "PosixPath('/home/me/run')"})),
     "absolute paths"),
], ids=["not-run", "out-of-order", "error", "no-figure", "progress", "widget", "path-stream", "path-result"])
def test_check_stored_rejects(spoil, message):
    nb = _executed_notebook()
    check_stored(Path("x.ipynb"), nb)                 # the clean run passes
    spoil(nb.cells[2])
    with pytest.raises(AssertionError, match=message):
        check_stored(Path("x.ipynb"), nb)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem not in NOT_RUN],
                         ids=[p.stem for p in NOTEBOOKS if p.stem not in NOT_RUN])
def test_notebook_runs(path, tmp_path, monkeypatch):
    if not _kernel_available():
        pytest.skip("no 'python3' Jupyter kernel installed (pip install ipykernel)")
    for name in KERNEL_ENV_UNSET:
        monkeypatch.delenv(name, raising=False)   # outputs go to ./notebook-out of the kernel
    for name, value in KERNEL_ENV.items():
        monkeypatch.setenv(name, value)
    check_run(path, execute(path, tmp_path), tmp_path)


def store(names: list[str]) -> None:
    """Execute the named notebooks (default all) as :func:`test_notebook_runs` does and store them executed."""
    for name in KERNEL_ENV_UNSET:
        os.environ.pop(name, None)
    os.environ.update(KERNEL_ENV)
    paths = [p for p in NOTEBOOKS if not names or p.stem in names]
    unknown = set(names) - {p.stem for p in paths}
    if unknown:
        raise SystemExit(f"no notebook named {sorted(unknown)}; notebooks: {[p.stem for p in NOTEBOOKS]}")
    for path in paths:
        with tempfile.TemporaryDirectory() as tmp:
            nb = execute(path, Path(tmp))
            check_run(path, nb, Path(tmp))
        check_stored(path, nb)
        nbformat.write(nb, path)
        print(f"stored {path.name}: {_images(nb)} figures, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    store(sys.argv[1:])
