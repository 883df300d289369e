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


def test_quickstart_reference_cells_match_recurrentgemma(tmp_path):
    """The quickstart's "Load a reference implementation's weights" cells against recurrentgemma
    itself: the notebook kernel above has no recurrentgemma, so its cells run here in the peers'
    JAX environment (.peers/jax, where recurrentgemma is installed), the checkout on the path."""
    import re
    import subprocess

    from tests.memzoo.helpers import peers_missing
    python = ROOT / ".peers" / "jax" / "bin" / "python"
    if not python.exists():
        peers_missing(f"{python} missing (bash ../shared/peers/setup.sh .peers builds it)")
    cells = jupytext.read(ROOT / "notebooks" / "01_quickstart.py").cells
    start = next(i for i, c in enumerate(cells) if "## 7. Load a reference" in c.source)
    # IPython magics (the colab-only %pip) are not Python: commented out, as jupytext stores them.
    code = [re.sub(r"(?m)^(\s*)%", r"\1# %", c.source) for c in cells[start:]
            if c.cell_type == "code"]
    # The notebook's own definitions the section uses, at the quick sizes.
    script = "\n".join(["import importlib.util", "import jax, jax.numpy as jnp, numpy as np",
                        "BATCH, LENGTH, VOCAB = 2, 16, 32",
                        "tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, VOCAB)",
                        *code])
    (tmp_path / "cells.py").write_text(script)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([str(python), str(tmp_path / "cells.py")], capture_output=True,
                          text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rmse = re.search(r"logits relative RMSE (\S+)", proc.stdout)
    assert rmse and float(rmse.group(1)) <= 1e-4, proc.stdout
    assert "round trip exact: True" in proc.stdout, proc.stdout
