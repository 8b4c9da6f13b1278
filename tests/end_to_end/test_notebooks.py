"""The Colab notebooks: executed headless with their CI settings, and committed without outputs.

Each notebook runs in a fresh `python3` Jupyter kernel with cwd `colab/`, DMMD_JAX_NOTEBOOK_CI=1
(tiny presets) and DMMD_JAX_NOTEBOOK_WORKDIR pointing at a temporary folder; any cell error fails
the test with the cell's traceback. XLA's backend optimisation is switched off for these kernels:
the tiny models are compile-bound, and this halves the CPU time with a cold compilation cache.
"""

import json
import os
import pathlib

import pytest

COLAB = pathlib.Path(__file__).resolve().parents[2] / "colab"
NOTEBOOKS = ("quickstart.ipynb", "distill_your_teacher.ipynb")
CELL_TIMEOUT_S = 240


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = json.loads((COLAB / name).read_text())
  dirty = [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
           and (cell.get("outputs") or cell.get("execution_count") is not None)]
  assert not dirty, f"{name}: cells {dirty} have outputs; strip them before committing."


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  monkeypatch.setenv("DMMD_JAX_NOTEBOOK_CI", "1")
  monkeypatch.setenv("DMMD_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip())
  nb = nbformat.read(str(COLAB / name), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(COLAB)}})
  client.execute()  # raises CellExecutionError (with the traceback) on any failing cell
  errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
  assert not errors
