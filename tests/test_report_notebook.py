"""notebooks/results.ipynb runs top to bottom on the golden fixtures' metrics_long.csv (so it cannot rot)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lorsbench.report import write_report

DEV = 'notebook tests need the dev extra: pip install "lorsbench[dev]"'
nbformat = pytest.importorskip("nbformat", reason=DEV)
NotebookClient = pytest.importorskip("nbclient", reason=DEV).NotebookClient
pytest.importorskip("ipykernel", reason=DEV)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "results.ipynb"


def test_results_notebook_executes(tmp_path, monkeypatch):
    folder = write_report([REPO / "tests" / "fixtures" / "runs"], "golden", tmp_path)
    monkeypatch.setenv("LORSBENCH_METRICS_CSV", str(folder / "metrics_long.csv"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it clean"
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4
    text = "".join(o.get("text", "") for o in outputs)
    assert "metrics_long.csv: 16 runs" in text  # the Hydra job folder without run.json has no metrics
