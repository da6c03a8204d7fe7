"""``python -m memos_rerank_integrations.cli``: the ``memos-rerank`` command."""

import sys

from . import main

sys.exit(main())
