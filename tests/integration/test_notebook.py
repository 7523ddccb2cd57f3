"""notebooks/quickstart.ipynb runs top to bottom (every cell, real pipeline, training, export, denoise, serving)."""

import re

import nbformat
import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback, if any cell fails
    outputs = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []))
    assert "MirroredStrategy" in outputs and "serving_default" in outputs
    # gRPC sends float32 HU unchanged: the served model must answer what the local one does.
    difference = re.search(r"max \|gRPC - local\| HU: (\S+)", outputs)
    assert difference and float(difference.group(1)) < 1e-3, outputs[-2000:]
    assert (tmp_path / "quickstart_output" / "evaluation" / "report.md").exists()
