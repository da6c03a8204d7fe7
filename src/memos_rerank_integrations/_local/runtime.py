"""What every local backend shares: device and dtype choice, and the process-wide
model cache (with loading serialized against every other model use).

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib.util
import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .._engine.cpu import cpu_has_native_bf16
from .._exceptions import InvalidInputError, ModelLoadError
from .._extras import missing_extra

if TYPE_CHECKING:
    import torch

__all__ = [
    "clear_model_cache",
    "in_model_thread",
    "inference",
    "load_shared",
    "model_cache_key",
    "require_local",
    "resolve_device",
    "resolve_dtype",
    "use_torch_threads",
]

logger = logging.getLogger("memos_rerank_integrations")

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


async def in_model_thread(call: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)`` on the process's one thread for local models' async
    calls (with the caller's context variables, e.g. a latency budget), so the event
    loop never blocks.

    One thread, not a pool: torch's OpenMP runtime gives every thread that runs
    parallel work a team of its own, and with more teams than cores it stops letting
    idle workers spin between operations, which slows every pass (by a fifth on two
    cores); local passes share the cores anyway, and run one at a time per model."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memos-rerank-local")
        executor = _executor
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        executor, functools.partial(context.run, call, *args, **kwargs)
    )


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


def use_torch_threads(count: int) -> None:
    """Run the calling thread's torch work on ``count`` threads: the size of the
    OpenMP team torch (and oneDNN) start is the calling thread's own setting, so
    threads that each set theirs run side by side with teams of different sizes."""
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


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
    """Check that torch and transformers are installed (found, not imported: importing
    transformers takes a while, and a model read from its files never needs it), or
    explain which extra to install."""
    for name in ("torch", "transformers"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise missing_extra("local", name, feature=feature)


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
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


class _LoadGate:
    """Loading a model excludes every other use of torch models in the process.

    transformers' ``from_pretrained`` changes process-wide state while it loads
    (torch's default dtype, a meta-device context for empty weights): a second
    load, or a forward pass, running at the same time in another thread builds
    tensors of the wrong dtype or on the meta device. Loads take the gate alone
    (one at a time); forward passes share it, so different models still run in
    parallel. Waiting loads go first, so a busy model cannot starve them.

    Lock order: a model's own lock first, the gate last; nothing waits for a
    lock while holding the gate.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._users = 0
        self._loading = False
        self._waiting_loads = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        if getattr(self._local, "depth", 0):  # a loader that loads (or uses) a model
            yield
            return
        with self._condition:
            self._waiting_loads += 1
            try:
                self._condition.wait_for(lambda: not self._loading and self._users == 0)
            finally:
                self._waiting_loads -= 1
            self._loading = True
        with self._held(self._end_load):
            yield

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self._condition:
            self._condition.wait_for(lambda: not self._loading and self._waiting_loads == 0)
            self._users += 1
        with self._held(self._end_use):
            yield

    @contextlib.contextmanager
    def _held(self, release: Callable[[], None]) -> Iterator[None]:
        """This thread holds the gate until the block ends; then ``release`` runs
        under the condition and every waiter is woken."""
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._condition:
                release()
                self._condition.notify_all()

    def _end_load(self) -> None:
        self._loading = False

    def _end_use(self) -> None:
        self._users -= 1


_gate = _LoadGate()


def inference() -> contextlib.AbstractContextManager[None]:
    """Hold around every forward pass of a local model (after taking the model's own
    lock): it waits while a model loads anywhere in the process, and keeps loads
    out while it runs."""
    return _gate.using()


_cache: dict[Hashable, Any] = {}
_cache_lock = threading.Lock()
_key_locks: dict[Hashable, threading.Lock] = {}


def load_shared(key: Hashable, loader: Callable[[], T], *, model: str, exclusive: bool = True) -> T:
    """Load once per process per ``key`` (model, kind, device, dtype, ...).

    Concurrent first calls for one key wait for a single load. Loads of different
    models run one at a time, and while one runs no forward pass of any local
    model does (see :func:`inference`): transformers' loading is not thread-safe.
    ``exclusive=False`` is for loaders that build no torch tensors (a tokenizer):
    they run without waiting for, or holding off, other loads and passes.
    Any loading failure becomes a :class:`ModelLoadError` that names the model and
    says how to use a local copy.
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
            with _gate.loading() if exclusive else contextlib.nullcontext():
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
