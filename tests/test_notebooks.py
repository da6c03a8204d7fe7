"""The notebooks in ``notebooks/`` are stored without outputs and run offline.

Each one is executed top to bottom by ``nbclient`` in a fresh kernel of this very
interpreter (a kernelspec written to a temporary ``JUPYTER_PATH``), with this
checkout's ``src`` on ``PYTHONPATH`` and ``HF_HUB_OFFLINE=1``. The notebooks assert
on their own results (e.g. the baijiu memory first for the liquor query), so a
wrong ranking fails here, not only an exception; their outputs hold no warning.

``notebooks/rendered/`` holds an executed copy of each (``python notebooks/render.py``)
for readers without Jupyter: the same code, with its outputs and plots.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .support.backends import SRC

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
RENDERED = NOTEBOOKS / "rendered"
PLOTS = {"01_langchain.ipynb": 0, "02_llama_index.ipynb": 1, "03_thresholds.ipynb": 3}
WARNING_MARKS = ("Warning", "deprecated", "IProgress")
NAMES = ["01_langchain.ipynb", "02_llama_index.ipynb", "03_thresholds.ipynb"]
# Per cell; alone on two cores each notebook takes 10-20 s, the bounds leave room for a
# busy machine while still catching a hang.
CELL_TIMEOUT_S = 120
NOTEBOOK_BUDGET_S = 240


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = "memos-rerank-tests"
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / name
    spec_dir.mkdir(parents=True)
    python_path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "memos-rerank tests",
        "language": "python",
        "env": {"PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(
            "JUPYTER_PATH",
            os.pathsep.join(filter(None, [str(jupyter_dir), os.environ.get("JUPYTER_PATH")])),
        )
        yield name


def test_every_notebook_is_tested() -> None:
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("name", NAMES)
def test_runs_offline(name: str, kernel_name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    started = time.monotonic()
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    assert time.monotonic() - started < NOTEBOOK_BUDGET_S
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "Traceback" not in text
    # No warning of a library (deprecations, tqdm without ipywidgets) in the outputs.
    assert not [mark for mark in WARNING_MARKS if mark in text], text
    # The plots render (inline backend, headless).
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == PLOTS[name]


def code_sources(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("name", NAMES)
def test_rendered_copy_is_current(name: str) -> None:
    """The committed rendered copy runs the notebook's present code, with every output
    and plot; its markdown twin shows the same plots as PNG files."""
    stored = nbformat.read(NOTEBOOKS / name, as_version=4)
    rendered = nbformat.read(RENDERED / name, as_version=4)
    assert [c.source for c in rendered.cells] == [c.source for c in stored.cells], (
        f"rendered/{name} is stale: run python notebooks/render.py"
    )
    code_cells = [cell for cell in rendered.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) == PLOTS[name]
    markdown = (RENDERED / name.replace(".ipynb", ".md")).read_text(encoding="utf-8")
    for source in code_sources(stored):
        assert source.rstrip() in markdown
    for k in range(1, PLOTS[name] + 1):
        png = f"{name.removesuffix('.ipynb')}_{k}.png"
        assert f"]({png})" in markdown
        assert (RENDERED / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
