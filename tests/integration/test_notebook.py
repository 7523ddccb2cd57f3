"""notebooks/quickstart.ipynb: committed with its outputs (a reader on GitHub sees the results without running it), and
it still runs top to bottom, offline, writing nothing into the working folder (issue 26 item 8)."""

import re
from pathlib import Path

import nbformat
import pytest

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
MAX_BYTES = 1_500_000  # small figures (dpi 60): the notebook stays a reasonable thing to commit and to diff


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _text(notebook) -> str:
    """Everything the code cells printed or displayed as text (streams and Markdown tables)."""
    parts = []
    for cell in _code_cells(notebook):
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/markdown", ""))
    return "".join(parts)


def check_results(notebook) -> None:
    """What the notebook must show: the shipped model v3 on packaged CT with pictures, a table beside BM3D and the
    input, and a short training run whose validation PSNR ends above the input's."""
    cells = _code_cells(notebook)
    errors = [out for cell in cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    text = _text(notebook)
    assert "Traceback" not in text and "\x1b[" not in text, text[-2000:]
    assert "model: ldct_denoiser version 3" in text
    assert re.search(r"\| quarter dose \(input\) \|.*\n\| BM3D \(adaptive\) \|.*\n\| ldct_denoiser v3 \|", text)
    pictures = sum("image/png" in out.get("data", {}) for cell in cells for out in cell.get("outputs", []))
    assert pictures >= 3  # before/after of the shipped model, the learning curve, the small model's result
    trained = re.search(r"validation PSNR ([\d.]+) dB after (\d+) steps: ([+-][\d.]+) dB over the input", text)
    assert trained, text[-3000:]
    assert float(trained.group(3)) > 1.0  # visibly learns: well above the quarter-dose input


def test_committed_notebook_carries_its_outputs_from_one_run_and_no_error():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cells = _code_cells(notebook)
    assert all(cell.get("outputs") for cell in cells), "a code cell without output: run the notebook before committing"
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))  # top to bottom, one kernel
    check_results(notebook)
    assert NOTEBOOK.stat().st_size < MAX_BYTES


def test_notebook_writes_only_into_a_temporary_folder():
    source = "\n".join(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells)
    assert "tempfile.mkdtemp" in source and "quickstart_output" not in source
    assert "L286" not in source  # the held-out test patient: never


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback, if any cell fails
    check_results(notebook)
    assert list(tmp_path.iterdir()) == []  # nothing written into the working folder
    removed = re.search(r"removed (\S+)", _text(notebook))
    assert removed and not Path(removed.group(1)).exists()  # and the temporary folder cleaned up
