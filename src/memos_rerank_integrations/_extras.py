"""Helpful ImportErrors for optional dependencies."""

from __future__ import annotations

__all__ = ["missing_extra"]


def missing_extra(extra: str, package: str, *, feature: str) -> ImportError:
    """An ImportError that tells the user which extra to install."""
    return ImportError(
        f"{feature} needs the optional dependency {package!r}, which is not installed. "
        f"Install it with: pip install 'memos-rerank-integrations[{extra}]'"
    )
