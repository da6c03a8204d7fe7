"""mkdocs hook: link the notebooks rendered by ``python notebooks/render.py`` (into the
git-ignored ``docs/notebooks/``) from the Notebooks page, or say that there are none."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

MARKER = "<!-- rendered notebooks -->"
RENDERED = "notebooks/"


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != "notebooks.md":
        return markdown
    pages = sorted(
        file.src_uri
        for file in files
        if file.src_uri.startswith(RENDERED) and file.src_uri.endswith(".md")
    )
    if not pages:
        listing = "none (run `python notebooks/render.py` before building the site)."
    else:
        items = []
        for uri in pages:
            stem = PurePosixPath(uri).stem
            items.append(f"- [{_title(files.get_file_from_path(uri), stem)}]({uri})")
            executed = f"{RENDERED}{stem}.ipynb"
            if files.get_file_from_path(executed) is not None:
                items[-1] += f" (executed notebook: [{stem}.ipynb]({executed}))"
        listing = "\n".join(items)
    return markdown.replace(MARKER, listing)


def _title(file: Any, default: str) -> str:
    """The first level-one heading of a rendered page (the notebook's title)."""
    for line in file.content_string.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return default
