"""The notebooks in ``notebooks/`` are stored without outputs and run offline.

Each one is executed top to bottom by ``nbclient`` in a fresh kernel of this very
interpreter (a kernelspec written to a temporary ``JUPYTER_PATH``), with this
checkout's ``src`` on ``PYTHONPATH`` and ``HF_HUB_OFFLINE=1``. The notebooks assert
on their own results (e.g. the baijiu memory first for the liquor query), so a
wrong ranking fails here, not only an exception; their outputs hold no warning.

The notebooks are stored once. ``python notebooks/render.py`` executes them and writes
readable copies (the executed notebook, a markdown page, the plots as PNG files) into the
git-ignored ``docs/notebooks/``; each test run below also writes those copies, with the
same ``render.write``, from the notebook it has just executed, and checks them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from nbclient import NotebookClient

from .support.backends import SRC

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PLOTS = {"01_langchain.ipynb": 0, "02_llama_index.ipynb": 1, "03_thresholds.ipynb": 3}
WARNING_MARKS = ("Warning", "deprecated", "IProgress")
NAMES = ["01_langchain.ipynb", "02_llama_index.ipynb", "03_thresholds.ipynb"]
# Per cell; alone on two cores each notebook takes 10-20 s, the bounds leave room for a
# busy machine while still catching a hang.
CELL_TIMEOUT_S = 120
NOTEBOOK_BUDGET_S = 240


def load_render() -> ModuleType:
    """``notebooks/render.py``, the one command that renders the notebooks."""
    spec = importlib.util.spec_from_file_location("notebooks_render", NOTEBOOKS / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_the_notebooks_are_stored_once() -> None:
    """No executed or rendered copy is kept in the repository: only the notebooks."""
    stored = sorted(
        path.relative_to(NOTEBOOKS).as_posix()
        for path in NOTEBOOKS.rglob("*")
        if path.is_file() and not {"__pycache__", ".ipynb_checkpoints"} & set(path.parts)
    )
    assert stored == sorted([*NAMES, "data/labelled_memories.json", "render.py"])


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("name", NAMES)
def test_runs_offline(name: str, kernel_name: str, tmp_path: Path) -> None:
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
    check_rendered_copies(notebook, name, tmp_path)


def code_sources(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def check_rendered_copies(executed: nbformat.NotebookNode, name: str, out: Path) -> None:
    """What ``python notebooks/render.py`` writes for an executed notebook: the executed
    copy, with every output, and a markdown page with the notebook's code and its plots
    as PNG files."""
    stem = name.removesuffix(".ipynb")
    written = load_render().write(executed, stem, out)
    assert {path.name for path in written} == {
        name,
        f"{stem}.md",
        *(f"{stem}_{k}.png" for k in range(1, PLOTS[name] + 1)),
    }
    stored = nbformat.read(NOTEBOOKS / name, as_version=4)
    copy = nbformat.read(out / name, as_version=4)
    assert [c.source for c in copy.cells] == [c.source for c in stored.cells]
    code_cells = [cell for cell in copy.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    markdown = (out / f"{stem}.md").read_text(encoding="utf-8")
    assert markdown.count("```python\n") == len(code_sources(stored))
    for source in code_sources(stored):
        assert source.rstrip() in markdown
    for k in range(1, PLOTS[name] + 1):
        png = f"{stem}_{k}.png"
        assert f"]({png})" in markdown
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
