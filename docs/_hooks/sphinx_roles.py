"""Griffe extension: the docstrings write cross-references as Sphinx roles
(``:class:`~memos_rerank_integrations.Stage```); the API reference shows them as code
(``Stage``), with a leading ``~`` meaning the last part of the path only."""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|attr|mod|exc|data|obj|const):`(?P<short>~?)(?P<target>[^`]+)`"
)


def _code(match: re.Match[str]) -> str:
    target = match["target"].strip()
    if match["short"]:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRoles(Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
