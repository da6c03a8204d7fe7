"""The files a new user meets first: the license, and the version written in one place."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import memos_rerank_integrations

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict[str, object]:
    loaded: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    return loaded


def test_the_version_is_written_once() -> None:
    data = pyproject()
    project = data["project"]
    assert isinstance(project, dict)
    assert "version" not in project and "version" in project["dynamic"]
    source = data["tool"]["hatch"]["version"]["path"]  # type: ignore[index]
    init = ROOT / source
    assert init == Path(memos_rerank_integrations.__file__).resolve()
    written = re.findall(r'^__version__ = "([^"]+)"$', init.read_text("utf-8"), re.M)
    assert written == [memos_rerank_integrations.__version__]


def test_the_license_is_the_one_pyproject_names() -> None:
    assert pyproject()["project"]["license"] == "Apache-2.0"  # type: ignore[index]
    text = (ROOT / "LICENSE").read_text("utf-8")
    assert text.startswith("Copyright ") and "memos-rerank-integrations contributors" in text
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
