"""``python -m memos_rerank_integrations.cli``: the ``memos-rerank`` command."""

from . import script

script()
