"""What every local backend shares: device and dtype choice, the process-wide
model cache, and length-sorted, token-budget batching.

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._exceptions import InvalidInputError, ModelLoadError
from ._extras import missing_extra

if TYPE_CHECKING:
    import torch

__all__ = [
    "budget_batches",
    "check_positive_int",
    "clear_model_cache",
    "load_shared",
    "model_cache_key",
    "require_local",
    "resolve_device",
    "resolve_dtype",
]

logger = logging.getLogger("memos_rerank_integrations")

T = TypeVar("T")

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def check_positive_int(value: object, *, name: str, allow_none: bool = False) -> int | None:
    """Validate an integer option that must be >= 1 (or ``None`` where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise InvalidInputError(f"{name} must be {expected}, got {value!r}.")
    return value


def model_cache_key(
    kind: str, model: str | Path, device: torch.device, dtype: torch.dtype
) -> tuple[str, str, str, str]:
    """The :func:`load_shared` key of a local model: one load per kind of scorer,
    model (a local path counts by its resolved location), device and dtype."""
    name = str(model)
    local = Path(name).expanduser()
    if local.exists():
        name = str(local.resolve())
    return (kind, name, str(device), str(dtype))


def require_local(feature: str) -> None:
    """Check torch and transformers import, or explain which extra to install."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise missing_extra("local", exc.name or "torch", feature=feature) from exc


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA, then MPS, then CPU, when called (never at import time)."""
    require_local("Local reranking")
    import torch

    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InvalidInputError(
                f"Unknown device {device!r}; use 'cpu', 'cuda', 'cuda:0' or 'mps'."
            ) from exc
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` picks bfloat16 where the hardware has native bf16 matrix units
    (CUDA with bf16 support; CPUs with AVX512-BF16 or AMX), else float32."""
    require_local("Local reranking")
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = _DTYPE_NAMES.get(dtype.lower().removeprefix("torch."))
        if name is None:
            raise InvalidInputError(
                f"Unknown dtype {dtype!r}; use 'float32', 'bfloat16', 'float16' or a torch.dtype."
            )
        resolved: torch.dtype = getattr(torch, name)
        return resolved
    if dtype is not None:
        raise InvalidInputError(f"dtype must be a torch.dtype, a name or None, got {dtype!r}.")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


_cache: dict[Hashable, Any] = {}
_cache_lock = threading.Lock()
_key_locks: dict[Hashable, threading.Lock] = {}


def load_shared(key: Hashable, loader: Callable[[], T], *, model: str) -> T:
    """Load once per process per ``key`` (model, kind, device, dtype, ...).

    Concurrent first calls for one key wait for a single load; different keys load
    in parallel. Any loading failure becomes a :class:`ModelLoadError` that names
    the model and says how to use a local copy.
    """
    with _cache_lock:
        if key in _cache:
            return _cache[key]  # type: ignore[no-any-return]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]  # type: ignore[no-any-return]
        try:
            value = loader()
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load model {model!r}: {type(exc).__name__}: {exc}. "
                "Pass a local directory (a copy saved with save_pretrained, or downloaded "
                "with `huggingface-cli download`) as the model, or make sure the Hugging Face "
                "Hub is reachable (and HF_HUB_OFFLINE is unset)."
            ) from exc
        logger.info("Loaded model %s", model)
        with _cache_lock:
            _cache[key] = value
        return value


def clear_model_cache() -> None:
    """Forget every loaded model (the next use loads again)."""
    with _cache_lock:
        _cache.clear()


def budget_batches(
    lengths: Sequence[int], *, max_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Group indices into batches sorted by length (longest first) so that each
    batch's padded size, rows x longest row, stays within ``max_tokens``.

    A single row longer than the budget gets a batch of its own.
    """
    if max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be positive, got {max_tokens}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
