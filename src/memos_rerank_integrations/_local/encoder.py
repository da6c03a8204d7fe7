"""What the sequence-classification and embedding rerankers share.

Both load a Hugging Face encoder lazily and share it process-wide, validate
calls the same way, score many independent calls in shared forward passes, and
run the async path in a worker thread. They differ only in how they load the
model and how they turn token ids into scores (:meth:`LocalEncoderReranker._score`).

torch is imported inside functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import threading
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .._calls import check_stop
from .._engine.batching import budget_batches, limit_padding
from .._exceptions import InvalidInputError, ModelLoadError
from .._types import StageThresholds, positive_int
from .base import LocalReranker
from .runtime import inference, load_shared, require_local, resolve_device, resolve_dtype

if TYPE_CHECKING:
    import torch

__all__ = [
    "EncodedCalls",
    "LoadedEncoder",
    "LocalEncoderReranker",
    "checkpoint_architecture",
    "choose_pad_id",
    "load_encoder",
    "refuse_untrained_weights",
    "right_class_hint",
    "run_batches",
]

Encodings = Mapping[str, Sequence[Sequence[int]]]

# Tokenizers without a known limit report this sentinel (about 1e30) as model_max_length.
_NO_LIMIT = 10**9
# As in the Qwen path: split a batch when over a tenth of it would be padding, but not
# below a few hundred tokens per pass.
_MAX_PADDING = 0.1
_MIN_BATCH_TOKENS = 256


@dataclass
class LoadedEncoder:
    """A loaded model and tokenizer, shared by every reranker over the same
    (kind, model, device, dtype). ``lock`` serializes the model's forward passes
    (they gain nothing from running concurrently); ``tokenizer_lock`` the
    tokenizer's use (a fast tokenizer must not be called from two threads at once),
    so that tokenizing never waits for a forward pass."""

    model: Any
    tokenizer: Any
    device: torch.device
    pad_id: int
    length_limit: int | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    # A forward over packed (unpadded) rows where one covers the model exactly
    # (see _bert_engine); else None and the transformers forward runs on padded rows.
    packed: Callable[[Encodings, torch.device], torch.Tensor] | None = None


@dataclass
class EncodedCalls:
    """Token ids of every row to run for some calls (``encodings``), what each call
    needs to turn the rows' outputs into scores (``plan``), and the prompt tokens
    each call scores (``tokens``)."""

    encodings: dict[str, list[list[int]]]
    plan: Any
    tokens: list[int]


def choose_pad_id(tokenizer: Any, config: Any) -> int:
    """The id to pad batches with, making sure tokenizer and config agree on it.

    The config's ``pad_token_id`` wins when set, because models that pool the last
    real token (Qwen3 "seq-cls" conversions) find it by comparing ids with it.
    Otherwise the tokenizer's pad token, then its EOS or UNK token, is used; padded
    positions are masked out, so which real token pads does not change scores.
    """
    configured = getattr(config, "pad_token_id", None)
    if isinstance(configured, int):
        pad_id = configured
    else:
        candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
        pad_id = next((c for c in candidates if isinstance(c, int)), 0)
        config.pad_token_id = pad_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    return pad_id


def load_encoder(
    model: str,
    auto_class: Any,
    device: torch.device,
    dtype: torch.dtype,
    *,
    reranker: str,
    unused: tuple[str, ...] = (),
) -> LoadedEncoder:
    """Load ``model`` with a transformers ``Auto*`` class and its tokenizer, in eval mode.

    A checkpoint that lacks weights the model needs, or holds them in another shape,
    is a :class:`ModelLoadError` (see :func:`refuse_untrained_weights`); weights whose
    names start with one of ``unused`` are never run by ``reranker`` and may be missing.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    # Mismatched shapes are loaded (at random) and reported, so the error can name them.
    network, report = auto_class.from_pretrained(
        model, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
    )
    refuse_untrained_weights(model, network.config, report, reranker=reranker, unused=unused)
    network.to(device).eval()
    pad_id = choose_pad_id(tokenizer, network.config)
    return LoadedEncoder(network, tokenizer, device, pad_id, _length_limit(tokenizer))


def refuse_untrained_weights(
    model: str,
    config: Any,
    report: Mapping[str, Any],
    *,
    reranker: str,
    unused: tuple[str, ...] = (),
) -> None:
    """Raise :class:`ModelLoadError` when transformers' loading ``report``
    (``from_pretrained(..., output_loading_info=True)``) lists weights the checkpoint
    lacks (``missing_keys``) or holds in another shape (``mismatched_keys``), except
    those starting with one of ``unused``: transformers initialises them at random, so
    every process would score differently. The message names the weights, the
    checkpoint's architecture and, where the architecture says so, the class that
    scores it (e.g. :class:`QwenReranker` for a causal LM)."""
    missing = sorted(
        str(key) for key in report.get("missing_keys") or () if not str(key).startswith(unused)
    )
    mismatched = sorted(
        f"{entry[0]} (checkpoint {_shape(entry[1])}, model {_shape(entry[2])})"
        for entry in report.get("mismatched_keys") or ()
        if not str(entry[0]).startswith(unused)
    )
    if not missing and not mismatched:
        return
    architecture = checkpoint_architecture(config)
    problems = []
    if missing:
        problems.append(f"no weights for {_listed(missing)}")
    if mismatched:
        problems.append(f"weights of another shape for {_listed(mismatched)}")
    raise ModelLoadError(
        f"Model {model!r} ({architecture or 'architecture not named'}) has "
        f"{' and '.join(problems)}: transformers would initialise them at random, so "
        f"{reranker} would score at random (differently in every process). "
        f"{right_class_hint(architecture, reranker)}"
    )


def checkpoint_architecture(config: Any) -> str | None:
    """The first class named in the checkpoint's ``config.architectures``, if any."""
    architectures = getattr(config, "architectures", None) or ()
    first = next(iter(architectures), None)
    return first if isinstance(first, str) else None


# The reranker that scores each kind of checkpoint, by the end of its class name.
_CAUSAL_LM = ("ForCausalLM", "LMHeadModel")
_CLASSIFIER = ("ForSequenceClassification",)


def right_class_hint(architecture: str | None, reranker: str) -> str:
    """One sentence saying which reranker scores a checkpoint of ``architecture``."""
    if architecture is not None:
        if architecture.endswith(_CAUSAL_LM) and reranker != "QwenReranker":
            return (
                f"{architecture} is a causal language model, not a cross-encoder: a "
                "Qwen3-Reranker (or a fine-tune of one) is scored by QwenReranker "
                "(backend 'qwen')."
            )
        if architecture.endswith(_CLASSIFIER) and reranker != "CrossEncoderReranker":
            return (
                f"{architecture} is a sequence-classification model (a cross-encoder): "
                "use CrossEncoderReranker (backend 'cross-encoder')."
            )
        if architecture.endswith("Model") and reranker == "CrossEncoderReranker":
            return (
                f"{architecture} is a bare encoder without a classification head: for "
                "an embedding model use EmbeddingReranker (backend 'embedding')."
            )
    return f"Use a checkpoint trained for {reranker}."


def _shape(shape: Any) -> str:
    return "x".join(str(int(size)) for size in shape) if shape is not None else "?"


def _listed(names: Sequence[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _length_limit(tokenizer: Any) -> int | None:
    """The longest input the tokenizer says its model accepts, if it says."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None


def _pad_rows(
    encodings: Encodings, rows: Sequence[int], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    import torch

    width = max(len(encodings["input_ids"][row]) for row in rows)
    batch = {}
    for name, values in encodings.items():
        fill = pad_id if name == "input_ids" else 0
        padded = [list(values[row]) + [fill] * (width - len(values[row])) for row in rows]
        batch[name] = torch.tensor(padded, dtype=torch.long, device=device)
    return batch


def run_batches(
    loaded: LoadedEncoder,
    encodings: Encodings,
    *,
    max_batch_tokens: int,
    forward: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
) -> torch.Tensor:
    """Run ``forward(model, batch)`` over length-sorted batches of at most
    ``max_batch_tokens`` padded tokens (right padding) and return its float32 rows
    in input order. Where the model has a packed engine (``loaded.packed``), each
    batch runs through it instead, unpadded (its attention buffers are bounded by
    the same budget)."""
    import torch

    # A row repeated (the same document twice in a call) is run once, so it ties exactly.
    names = list(encodings)
    first_seen: dict[tuple[tuple[int, ...], ...], int] = {}
    unique_of = []
    for row in range(len(encodings["input_ids"])):
        key = tuple(tuple(encodings[name][row]) for name in names)
        unique_of.append(first_seen.setdefault(key, len(first_seen)))
    unique = {name: [list(key[n]) for key in first_seen] for n, name in enumerate(names)}
    rows_in_order: list[int] = []
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        lengths = [len(ids) for ids in unique["input_ids"]]
        for budget_batch in budget_batches(lengths, max_tokens=max_batch_tokens):
            check_stop()  # a latency budget stops the call between batches
            if loaded.packed is not None:
                packed_rows = {name: [unique[name][r] for r in budget_batch] for name in names}
                outputs.append(loaded.packed(packed_rows, loaded.device).float().cpu())
                rows_in_order.extend(budget_batch)
                continue
            for rows in limit_padding(
                budget_batch, lengths, max_padding=_MAX_PADDING, min_tokens=_MIN_BATCH_TOKENS
            ):
                batch = _pad_rows(unique, rows, loaded.pad_id, loaded.device)
                outputs.append(forward(loaded.model, batch).float().cpu())
                rows_in_order.extend(rows)
        stacked = torch.cat(outputs)
        result = torch.empty_like(stacked)
        result[torch.tensor(rows_in_order)] = stacked
    return result[torch.tensor(unique_of)]


def _check_model(model: object) -> str:
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise InvalidInputError(
            f"model must be a Hugging Face Hub id or a local directory, got {model!r}."
        )
    return model


class LocalEncoderReranker(LocalReranker):
    """Base of the rerankers that run a Hugging Face encoder in this process."""

    _kind: ClassVar[str]

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        max_length: int,
        max_batch_tokens: int,
        normalize: bool,
        thresholds: StageThresholds,
    ) -> None:
        require_local(type(self).__name__)
        self.model = _check_model(model)
        # Explicit choices are checked now; None is resolved on first use.
        if device is not None:
            resolve_device(device)
        if dtype is not None:
            import torch

            resolve_dtype(dtype, torch.device("cpu"))
        self.max_length = positive_int("max_length", max_length)
        self.max_batch_tokens = positive_int("max_batch_tokens", max_batch_tokens)
        if not isinstance(thresholds, StageThresholds):
            raise InvalidInputError(
                f"thresholds must be a StageThresholds, got {type(thresholds).__name__}."
            )
        self.normalize = bool(normalize)
        self.thresholds = thresholds
        self._device_option = device
        self._dtype_option = dtype
        self._placement: tuple[torch.device, torch.dtype] | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model!r}, device={self._device_option!r}, "
            f"dtype={self._dtype_option!r}, max_length={self.max_length}, "
            f"normalize={self.normalize})"
        )

    @abstractmethod
    def _load(self, device: torch.device, dtype: torch.dtype) -> LoadedEncoder:
        """Load model and tokenizer (called once per process per cache key)."""

    @abstractmethod
    def _encode(self, loaded: LoadedEncoder, calls: list[tuple[str, list[str]]]) -> EncodedCalls:
        """Tokenize calls (called with ``loaded.tokenizer_lock`` held); bounded by the
        input's size: a long text is read only as far as can fit in ``max_length``."""

    @abstractmethod
    def _score(self, loaded: LoadedEncoder, encoded: EncodedCalls) -> list[list[float]]:
        """One score per document of every encoded call (called with ``loaded.lock``
        held)."""

    def _loaded(self) -> LoadedEncoder:
        if self._placement is None:
            device = resolve_device(self._device_option)
            self._placement = (device, resolve_dtype(self._dtype_option, device))
        device, dtype = self._placement
        key = (self._kind, self.model, str(device), dtype)
        return load_shared(key, lambda: self._load(device, dtype), model=self.model)

    def _max_length(self, loaded: LoadedEncoder) -> int:
        if loaded.length_limit is None:
            return self.max_length
        return min(self.max_length, loaded.length_limit)

    def _score_calls(self, calls: list[tuple[str, list[str]]]) -> list[list[float]]:
        loaded = self._loaded()
        with loaded.tokenizer_lock:
            encoded = self._encode(loaded, calls)
        with loaded.lock, inference():
            return self._score(loaded, encoded)

    def _count_tokens(self, query: str, documents: list[str]) -> int:
        loaded = self._loaded()
        with loaded.tokenizer_lock:
            return sum(self._encode(loaded, [(query, documents)]).tokens)
