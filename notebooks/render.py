"""Execute the notebooks and write the rendered copies in ``notebooks/rendered/``.

    python notebooks/render.py            # every notebook
    python notebooks/render.py 02         # the ones whose name starts with 02

For each ``NN_name.ipynb`` this writes ``rendered/NN_name.ipynb`` (executed, with its
outputs: GitHub and any Jupyter show it as is), and ``rendered/NN_name.md`` with
its plots as ``rendered/NN_name_K.png``, readable without Jupyter. The notebooks in
``notebooks/`` stay stripped of outputs; ``tests/test_notebooks.py`` checks that the
rendered copies hold the same code. Run offline, in a kernel of this interpreter with
this checkout's ``src`` first on ``PYTHONPATH``, like the tests.
"""

from __future__ import annotations

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
RENDERED = HERE / "rendered"
KERNEL = "memos-rerank-render"


def _kernel_dir() -> str:
    root = Path(tempfile.mkdtemp(prefix="memos-rerank-jupyter-"))
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
    return str(root)


def _markdown(notebook: nbformat.NotebookNode, stem: str) -> tuple[str, dict[str, bytes]]:
    parts: list[str] = [
        f"<!-- Rendered from ../{stem}.ipynb by notebooks/render.py; do not edit. -->\n"
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


def render(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook,
        kernel_name=KERNEL,
        timeout=300,
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    RENDERED.mkdir(exist_ok=True)
    nbformat.write(notebook, RENDERED / path.name)
    stem = path.stem
    for old in RENDERED.glob(f"{stem}_*.png"):
        old.unlink()
    text, images = _markdown(notebook, stem)
    (RENDERED / f"{stem}.md").write_text(text, encoding="utf-8")
    for name, png in images.items():
        (RENDERED / name).write_bytes(png)
    sys.stderr.write(f"rendered {path.name}: {len(images)} plots\n")


def main(prefixes: list[str]) -> None:
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        filter(None, [_kernel_dir(), os.environ.get("JUPYTER_PATH")])
    )
    for path in sorted(HERE.glob("*.ipynb")):
        if not prefixes or any(path.name.startswith(prefix) for prefix in prefixes):
            render(path)


if __name__ == "__main__":
    main(sys.argv[1:])
