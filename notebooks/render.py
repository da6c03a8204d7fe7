"""Execute the notebooks and write readable copies, with their outputs and plots.

    python notebooks/render.py                 # every notebook, into docs/notebooks/
    python notebooks/render.py 02              # the ones whose name starts with 02
    python notebooks/render.py --out DIR       # somewhere else

The notebooks in ``notebooks/`` are the only stored copy, kept without outputs. For
each ``NN_name.ipynb`` this writes, into the output folder (git-ignored):
``NN_name.ipynb`` (executed, with its outputs: any Jupyter shows it as is),
``NN_name.md`` (the same cells as markdown) and its plots as ``NN_name_K.png``. The
default folder is inside the documentation, so ``mkdocs serve`` or ``mkdocs build``
afterwards shows the notebooks as pages of the site, linked from its Notebooks page.
Runs offline, in a kernel of this interpreter with this checkout's ``src`` first on
``PYTHONPATH``, like ``tests/test_notebooks.py`` (which runs the notebooks and this
file's ``write``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
OUT = HERE.parent / "docs" / "notebooks"
KERNEL = "memos-rerank-render"


def _write_kernel(root: Path) -> None:
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    python_path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "memos-rerank render",
        "language": "python",
        "env": {"PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def _markdown(notebook: nbformat.NotebookNode, stem: str) -> tuple[str, dict[str, bytes]]:
    parts: list[str] = [
        f"<!-- Rendered from notebooks/{stem}.ipynb by notebooks/render.py; do not edit. -->\n"
    ]
    images: dict[str, bytes] = {}
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source.strip() + "\n")
            continue
        if cell.cell_type != "code":
            continue
        parts.append("```python\n" + cell.source.rstrip() + "\n```\n")
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                name = f"{stem}_{len(images) + 1}.png"
                images[name] = base64.b64decode(data["image/png"])
                parts.append(f"![plot {len(images)}]({name})\n")
                continue
            text = output.get("text") or data.get("text/plain", "")
            if isinstance(text, list):
                text = "".join(text)
            if text.strip():
                parts.append("```text\n" + text.rstrip() + "\n```\n")
    return "\n".join(parts), images


def execute(path: Path, kernel_name: str = KERNEL) -> nbformat.NotebookNode:
    """Run a notebook top to bottom (in ``notebooks/``, as Jupyter would) and return it."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=300,
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    return notebook


def write(notebook: nbformat.NotebookNode, stem: str, out: Path) -> list[Path]:
    """Write an executed notebook's copies into ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{stem}_*.png"):
        old.unlink()
    text, images = _markdown(notebook, stem)
    written = [out / f"{stem}.ipynb", out / f"{stem}.md"]
    nbformat.write(notebook, written[0])
    written[1].write_text(text, encoding="utf-8")
    for name, png in images.items():
        (out / name).write_bytes(png)
        written.append(out / name)
    return written


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="*", help="render only notebooks starting so")
    parser.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT}")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memos-rerank-jupyter-") as jupyter:
        _write_kernel(Path(jupyter))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            filter(None, [jupyter, os.environ.get("JUPYTER_PATH")])
        )
        for path in sorted(HERE.glob("*.ipynb")):
            if args.prefixes and not any(path.name.startswith(p) for p in args.prefixes):
                continue
            written = write(execute(path), path.stem, args.out)
            plots = sum(p.suffix == ".png" for p in written)
            sys.stderr.write(f"rendered {path.name} into {args.out}: {plots} plots\n")


if __name__ == "__main__":
    main(sys.argv[1:])
