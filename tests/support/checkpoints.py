"""Real checkpoints made wrong in one way: a copy of a saved model without some of
its weights, or with its config changed (what a hand-edited or mismatched
checkpoint on the Hub looks like to ``from_pretrained``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["with_config", "without_weights"]


def without_weights(source: Path, target: Path, *prefixes: str) -> Path:
    """A copy of the checkpoint in ``source`` whose ``model.safetensors`` lacks every
    tensor named with one of ``prefixes``; returns ``target``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if not name.startswith(prefixes)}
    assert len(kept) < len(weights), f"no weight of {source} starts with {prefixes}"
    save_file(kept, target / "model.safetensors", metadata={"format": "pt"})
    return target


def with_config(source: Path, target: Path, **changes: Any) -> Path:
    """A copy of the checkpoint in ``source`` with ``changes`` written into its
    ``config.json``; returns ``target``."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target
