"""The colab demos (notebooks/*.ipynb) run top to bottom in a fresh Jupyter kernel, at the reduced
size that MEMZOO_NOTEBOOK_QUICK=1 selects, with matplotlib's Agg backend and a time limit; each
.ipynb matches its jupytext text form (notebooks/*.py, the source of truth), is stored without
outputs, opens with its colab badge and has one guarded install cell."""
import os
import pathlib
import time

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300      # one cell
NOTEBOOK_BUDGET_S = 600   # the whole notebook, kernel start included
BADGE = "https://colab.research.google.com/github/memzoo/memzoo/blob/main/notebooks/{}"
INSTALL = '%pip install -q "memzoo @ git+https://github.com/memzoo/memzoo"'


def _ids(paths):
    return [p.stem for p in paths]


def test_every_notebook_has_a_text_form_and_back():
    assert NOTEBOOKS, "no notebooks found"
    texts = sorted((ROOT / "notebooks").glob("[0-9]*.py"))
    assert [p.stem for p in texts] == [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_paired_stripped_and_opens_with_badge_and_install(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    text = jupytext.read(path.with_suffix(".py"))
    assert [(c.cell_type, c.source.strip()) for c in nb.cells] == \
        [(c.cell_type, c.source.strip()) for c in text.cells], \
        f"{path.name} differs from {path.with_suffix('.py').name}: run `jupytext --sync` on it"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"{path.name}: outputs must be stripped"
    assert BADGE.format(path.name) in nb.cells[0].source
    installs = [c for c in nb.cells if c.cell_type == "code" and INSTALL in c.source]
    assert len(installs) == 1 and "find_spec(\"memzoo\") is None" in installs[0].source
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "MEMZOO_NOTEBOOK_QUICK" in params[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: quick sizes, no display, the checkout importable (so
    # the install cell is skipped), and none of the test session's XLA flags (a notebook that
    # wants simulated devices asks for them itself).
    monkeypatch.setenv("MEMZOO_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on any error
    seconds = time.perf_counter() - start
    assert seconds < NOTEBOOK_BUDGET_S, f"{path.name} took {seconds:.0f} s"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors
    # Every code cell ran, in order.
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))
