"""What this machine's CPU offers the engines: native bf16 matrix units and AMX tiles."""

from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_has_amx", "cpu_has_native_bf16"]


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles that torch can use (torch's own probe, which
    also asks the OS for the tile state; ``False`` where this torch has none)."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False
