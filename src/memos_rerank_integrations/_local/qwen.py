"""Qwen3-Reranker (and models fine-tuned from it, such as MemReranker), run locally.

Relevance is P("yes") of the causal LM under the model card's prompt. The scores
are the model card recipe's; the work is not:

* the recipe's token sequences are built exactly as the card builds them
  (prefix + body truncated to fit + suffix), and every saving below reuses
  positions whose token ids *are* a common prefix of those sequences, so BPE
  merges at the query/document boundary can never change a score;
* the system prompt + instruction part is run once per model, instruction,
  device and dtype and its KV cache is kept across calls;
* the part shared by every document of a call (the query) is run once per
  call and its KV cache is reused for all documents;
* only the last real position is read, and only projected onto
  ``W[yes] - W[no]`` (``sigmoid(h @ w)`` equals the recipe's
  ``exp(log_softmax([no, yes])[yes])``), never onto the full vocabulary;
* documents are sorted by length and batched under a token budget.

Tokenization is bounded by the size of the input, never by (query x documents): the
query is tokenized once per call (and capped at ``max_query_length`` tokens), each
document once, and only as much of a long document as can fit in ``max_length``
(see :func:`~memos_rerank_integrations._local_engine.encode_head`). The tokens are
spliced exactly where Qwen's pre-tokenizer always splits (after the body's
``<Document>:``), which a self-check on adversarial boundaries confirms when the
tokenizer loads (a tokenizer that fails it gets one bounded tokenization per
document instead).
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._calls import check_stop
from .._engine.batching import budget_batches, limit_padding
from .._engine.checkpoint import open_qwen3
from .._engine.qwen3 import CHUNK_TOKENS, PackedQwen3, PackedRow, checkpoint_engine, packed_engine
from .._exceptions import InvalidInputError, ModelLoadError
from .._qwen_prompt import DEFAULT_INSTRUCTION, DEFAULT_MODEL, PROMPT_PREFIX, PROMPT_SUFFIX
from .._types import (
    DEFAULT_THRESHOLDS,
    StageThresholds,
    check_text,
    optional_positive_int,
    positive_int,
)
from .base import LocalReranker
from .encoder import checkpoint_architecture, refuse_untrained_weights
from .runtime import (
    inference,
    load_shared,
    model_cache_key,
    require_local,
    resolve_device,
    resolve_dtype,
)
from .tokenize import encode_head
from .tokenizer_file import open_tokenizer_file

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_INSTRUCTION_LENGTH",
    "QwenReranker",
]

# The longest instruction QwenReranker takes, in characters (the model card's default
# has 88); on first use it must also leave room for the query and document within
# max_length tokens.
MAX_INSTRUCTION_LENGTH = 8192

_INSTRUCTION_CACHE_SIZE = 16
# The tokenizer is shared per model, whatever the device and dtype.
_NO_DEVICE: Any = "any-device"
_NO_DTYPE: Any = "any-dtype"
# Split a batch when over a tenth of it would be padding, but not below a few hundred
# tokens per pass: smaller matrix multiplies run far below peak on CPUs.
_MAX_PADDING = 0.1
_MIN_BATCH_TOKENS = 256


def _common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


# Per decoder layer, (keys, values) of shape [1, kv_heads, length, head_dim].
_KV = list[tuple["torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class _Prefix:
    """Token ids already run through the model, with their KV cache."""

    ids: tuple[int, ...]
    kv: _KV | None

    def crop(self, length: int) -> _Prefix:
        if length == len(self.ids):
            return self
        if length == 0 or self.kv is None:
            return _EMPTY_PREFIX
        kv = [(k[:, :, :length], v[:, :, :length]) for k, v in self.kv]
        return _Prefix(self.ids[:length], kv)


_EMPTY_PREFIX = _Prefix((), None)


@dataclass(frozen=True)
class _Row:
    """Tokens to run on top of a cached prefix."""

    prefix: _Prefix
    ids: list[int]


@dataclass(eq=False)
class _Group:
    """One call for the packed engine: its rows rest on ``prefix`` (a cached prefix of
    its sequences); ``head`` (maybe empty) is the rest of the part every sequence
    shares, each tail the rest of one sequence. ``kept`` is the head's KV cache once a
    pass has kept it for later passes."""

    position: int
    prefix: _Prefix
    head: list[int]
    tails: list[list[int]]
    kept: _Prefix | None = None


@dataclass(frozen=True)
class _Job:
    """A group's head (``tail=None``; ``keep``: keep its KV for later passes) or one
    of its tails, to run in a pass."""

    group: _Group
    tail: int | None
    keep: bool = False


def _plan(groups: Sequence[_Group], budget: int) -> list[list[_Job]]:
    """Passes of at most ``budget`` tokens (a row longer than that runs in a pass of
    its own, with its group's head where it has one). A group that fits runs whole in
    one pass (its head once, its tails attending to it); a larger one is split over
    passes: its head's KV is kept from its first pass where the head is at most a
    quarter of the budget (that cache costs every layer's keys and values), else the
    head runs again in each pass that holds its tails."""
    passes: list[list[_Job]] = []
    current: list[_Job] = []
    used = 0

    def flush() -> None:
        nonlocal current, used
        if current:
            passes.append(current)
        current, used = [], 0

    for group in groups:
        head = len(group.head)
        size = head + sum(len(tail) for tail in group.tails)
        if size <= budget:
            if used + size > budget:
                flush()
            if head:
                current.append(_Job(group, None))
            current.extend(_Job(group, index) for index in range(len(group.tails)))
            used += size
            continue
        keep = 0 < head <= budget // 4
        head_done = False  # kept by an earlier pass
        head_here = False  # in the current pass
        for index, tail in enumerate(group.tails):
            extra = head if head and not head_here and not head_done else 0
            if current and used + len(tail) + extra > budget:
                flush()
                head_here = False
                extra = head if head and not head_done else 0
            if extra:
                current.append(_Job(group, None, keep))
                used += extra
                head_here = True
                head_done = keep
            current.append(_Job(group, index))
            used += len(tail)
    flush()
    return passes


def _shared_lengths(base: Sequence[int], sequences: Sequence[list[int]]) -> tuple[int, int]:
    """How many leading tokens every sequence of a call shares (at least one token per
    sequence is left to run: its last position scores it), and how many of those the
    cached instruction prefix ``base`` already holds."""
    first = sequences[0]
    common = min(len(sequence) for sequence in sequences) - 1
    for sequence in sequences[1:]:
        common = min(common, _common_prefix_length(first, sequence))
    return common, min(common, _common_prefix_length(base, first))


# Documents that start where BPE, the pre-tokenizer or NFC could merge them with the
# text before them; the load-time self-check splices each after each head below.
_PROBE_DOCUMENTS = (
    "",
    " ",
    "  ",
    "   x",
    "\n",
    "\n\nx",
    " \n",
    "\t",
    "x",
    "X",
    "'s",
    "'ll",
    "s",
    "1",
    "12",
    ":",
    "::",
    ">",
    "<",
    "<|im_end|>",
    "<think>",
    "\u0301",
    "\u0301x",
    "\u0338",
    "e\u0301",
    "\u1161",
    "\u0cd5",
    "茅台",
    "🙂",
    "é",
    "\r\n",
    "\u00a0",
    "\u3000x",
)
_PROBE_HEADS = (
    "q",
    "q ",
    "q  ",
    "q\n",
    "q\n\n",
    "q?",
    "q:",
    "q<",
    "1",
    "茅",
    "e",
    "",
    " ",
    "\u0301",
)


def _head_text(instruction: str, query: str) -> str:
    """The body up to the document: tokenized once per call."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"


@dataclass(frozen=True)
class _CallTokens:
    """One call's recipe token sequences, ``head + tail`` for each document: ``head``
    is the system prompt + instruction + query part every document shares (already
    cut to fit), each tail a document's own tokens (cut to fit) + the suffix."""

    head: list[int]
    tails: list[list[int]]

    def sequences(self) -> list[list[int]]:
        return [self.head + tail for tail in self.tails]

    def count(self) -> int:
        return len(self.head) * len(self.tails) + sum(len(tail) for tail in self.tails)


class _QwenTokens:
    """A Qwen3-Reranker tokenizer (shared per model), its lock and the fixed parts of
    the prompt. A fast tokenizer must not be called from two threads at once; its
    lock is not the model's, so tokenizing never waits for a forward pass."""

    def __init__(self, tokenizer: Any, model: str) -> None:
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.yes = _token_id(tokenizer, "yes", model)
        self.no = _token_id(tokenizer, "no", model)
        self.prefix_ids = self._encode(PROMPT_PREFIX)
        self.suffix_ids = self._encode(PROMPT_SUFFIX)
        self._instruction_ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.splices_exactly = self._check_splice()

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def _check_splice(self) -> bool:
        """Whether ``tokens(head + " " + document) == tokens(head) + tokens(" " +
        document)`` on adversarial boundaries (true for Qwen's byte-level BPE)."""
        for head in _PROBE_HEADS:
            text = _head_text("i", head)
            head_ids = self._encode(text)
            for document in _PROBE_DOCUMENTS:
                if self._encode(f"{text} {document}") != head_ids + self._encode(f" {document}"):
                    return False
        return True

    def instruction_ids(self, instruction: str) -> tuple[int, ...]:
        """The system prompt + instruction part whose KV cache is kept across calls."""
        cached = self._instruction_ids.get(instruction)
        if cached is None:
            cached = tuple(self.prefix_ids + self._encode(f"<Instruct>: {instruction}\n<Query>:"))
            self._instruction_ids[instruction] = cached
            if len(self._instruction_ids) > _INSTRUCTION_CACHE_SIZE:
                self._instruction_ids.popitem(last=False)
        else:
            self._instruction_ids.move_to_end(instruction)
        return cached

    def budget(self, max_length: int) -> int:
        budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if budget < 1:
            raise InvalidInputError(
                f"max_length={max_length} leaves no room for the document: the prompt's fixed "
                f"prefix and suffix alone take {len(self.prefix_ids) + len(self.suffix_ids)} "
                "tokens. Use a larger max_length (the model card uses 8192)."
            )
        return budget

    def check_instruction(self, instruction: str, max_length: int) -> None:
        """Raise :class:`InvalidInputError` when the system prompt and ``instruction``
        with the prompt's suffix leave no token of ``max_length`` for the query and
        document (every document would score the same)."""
        fixed = len(self.instruction_ids(instruction)) + len(self.suffix_ids)
        if fixed >= max_length:
            raise InvalidInputError(
                f"The instruction takes {fixed - len(self.prefix_ids) - len(self.suffix_ids)} "
                f"tokens: with the prompt's fixed prefix and suffix that is {fixed} of "
                f"max_length={max_length}, leaving no room for the query and document. "
                "Shorten the instruction or raise max_length."
            )

    def cap_query(self, query: str, max_query_length: int | None) -> str:
        """The query cut to ``max_query_length`` tokens (decoded back to text)."""
        if max_query_length is None:
            return query
        (ids,) = encode_head(self.tokenizer, [query], max_query_length + 1)
        if len(ids) <= max_query_length:
            return query
        text: str = self.tokenizer.decode(ids[:max_query_length])
        return text

    def tokenize(
        self,
        instruction: str,
        query: str,
        documents: Sequence[str],
        *,
        max_length: int,
        max_query_length: int | None,
    ) -> _CallTokens:
        """The model card recipe's token ids for each document (call with ``lock``
        held): ``prefix + tokens(body)[:budget] + suffix`` with
        ``body = format_body(instruction, capped query, document)``.

        Work and memory grow with len(query) + sum(len(document)), each document
        read only as far as can fit.
        """
        budget = self.budget(max_length)
        self.check_instruction(instruction, max_length)
        if not documents:
            return _CallTokens(list(self.prefix_ids), [])
        text = _head_text(instruction, self.cap_query(query, max_query_length))
        unique = list(dict.fromkeys(documents))
        if self.splices_exactly:
            (body,) = encode_head(self.tokenizer, [text], budget + 1)
            body = body[:budget]
            room = budget - len(body)
            tails = encode_head(self.tokenizer, [f" {d}" for d in unique], room)
            by_document = {
                d: ids[:room] + self.suffix_ids for d, ids in zip(unique, tails, strict=True)
            }
            head = self.prefix_ids + body
        else:  # pragma: no cover - Qwen tokenizers splice exactly (checked at load)
            bodies = encode_head(self.tokenizer, [f"{text} {d}" for d in unique], budget)
            sequences = {d: ids[:budget] for d, ids in zip(unique, bodies, strict=True)}
            common = min(len(ids) for ids in sequences.values())
            first = next(iter(sequences.values()))
            for ids in sequences.values():
                common = min(common, _common_prefix_length(first, ids))
            head = self.prefix_ids + first[:common]
            by_document = {d: ids[common:] + self.suffix_ids for d, ids in sequences.items()}
        return _CallTokens(head, [by_document[d] for d in documents])


class _QwenScorer:
    """One loaded model (shared process-wide per model, device and dtype): the
    packed engine (or transformers' decoder where the engine does not cover the
    model), the yes-minus-no head, cached instruction prefixes, and the lock that
    serializes its use (``lock``; the tokenizer has its own, ``tokens.lock``)."""

    def __init__(
        self,
        tokens: _QwenTokens,
        decoder: Any,
        head: torch.Tensor,
        bias: float,
        device: torch.device,
        *,
        engine: PackedQwen3 | None = None,
    ) -> None:
        self.tokens = tokens
        # transformers' ``Qwen3Model`` where the model was loaded through transformers;
        # ``None`` where the engine was built from the checkpoint's files.
        self.decoder = decoder
        self.head = head
        self.bias = bias
        self.device = device
        self.lock = threading.Lock()
        self._instructions: OrderedDict[tuple[int, ...], _Prefix] = OrderedDict()
        self._cache_argument = "past_key_values"
        self.engine = engine
        # Cached prefixes are reused only where every layer attends to every earlier
        # position: a sliding-window layer's mask and cache do not take a prefix cache
        # built here, so such a model runs each sequence whole. (An engine built from
        # the checkpoint's files has full attention in every layer.)
        self.reuses_prefixes = True
        if decoder is not None:
            # transformers >= 5.2x names the KV-cache argument ``cache``
            # (``past_key_values`` is deprecated and warns on every call); older
            # versions know only the old name.
            parameters = inspect.signature(decoder.forward).parameters
            self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
            # The packed engine, where the model's architecture allows (else
            # transformers'); it owns the projection weights (held once, prepacked for
            # oneDNN on CPU).
            self.engine = packed_engine(decoder, own_weights=True)
            layer_types = getattr(decoder.config, "layer_types", None) or ["full_attention"]
            self.reuses_prefixes = all(kind == "full_attention" for kind in layer_types)
        elif engine is None:
            raise ValueError("a scorer needs a decoder or an engine")

    def replica(self) -> _QwenScorer:
        """A scorer on these same weights with a lock and instruction-prefix cache of
        its own: the packed engine's forward keeps no state between calls, so two
        replicas score at the same time on two threads. Without the engine
        (transformers' modules run the model) this scorer itself: calls then take
        turns."""
        if self.engine is None:
            return self
        twin = copy.copy(self)
        twin.lock = threading.Lock()
        twin._instructions = OrderedDict()
        return twin

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model runs in."""
        if self.engine is not None:
            return self.engine.dtype
        dtype: torch.dtype = self.decoder.dtype
        return dtype

    # -- scoring ---------------------------------------------------------------------

    def score(
        self, calls: Sequence[tuple[tuple[int, ...], list[list[int]]]], *, max_batch_tokens: int
    ) -> list[list[float]]:
        """Scores for each call's sequences; one call = (the token ids of its system
        prompt + instruction part, see :meth:`_QwenTokens.instruction_ids`, sequences).
        Call with ``lock`` held.

        A document repeated within a call is scored once, so duplicates tie exactly
        (and keep their input order).
        """
        unique_calls = []
        positions = []
        for instruction, sequences in calls:
            first_seen: dict[tuple[int, ...], int] = {}
            for sequence in sequences:
                first_seen.setdefault(tuple(sequence), len(first_seen))
            unique_calls.append((instruction, [list(sequence) for sequence in first_seen]))
            positions.append([first_seen[tuple(sequence)] for sequence in sequences])
        scores = self._score_unique(unique_calls, max_batch_tokens=max_batch_tokens)
        return [
            [call_scores[i] for i in call_positions]
            for call_scores, call_positions in zip(scores, positions, strict=True)
        ]

    def _score_unique(
        self, calls: Sequence[tuple[tuple[int, ...], list[list[int]]]], *, max_batch_tokens: int
    ) -> list[list[float]]:
        if self.engine is not None:
            return self._score_packed(calls, max_batch_tokens=max_batch_tokens)
        return self._score_transformers(calls, max_batch_tokens=max_batch_tokens)

    def _score_packed(
        self, calls: Sequence[tuple[tuple[int, ...], list[list[int]]]], *, max_batch_tokens: int
    ) -> list[list[float]]:
        """The packed engine's way: each call's shared part (its query) runs in the
        same pass as its documents (they attend to it), never as a pass of its own;
        passes hold at most ``max_batch_tokens`` tokens (a longer row runs alone, in
        chunks), and a call too large for one pass is split over several (its query
        then kept as a cached prefix, or run again where keeping it would cost more
        memory than a chunk)."""
        import torch

        with inference(), torch.inference_mode():
            groups = []
            for position, (instruction, sequences) in enumerate(calls):
                if not sequences:
                    continue
                base = self._instruction_prefix(instruction)
                first = sequences[0]
                common, reuse = _shared_lengths(base.ids, sequences)
                # A lone document gains nothing from a separate row for its query.
                cut = common if len(sequences) > 1 else reuse
                groups.append(
                    _Group(
                        position,
                        base.crop(reuse),
                        first[reuse:cut],
                        [sequence[cut:] for sequence in sequences],
                    )
                )
            results: list[list[float]] = [[0.0] * len(sequences) for _, sequences in calls]
            chunk = min(max_batch_tokens, CHUNK_TOKENS)
            for jobs in _plan(groups, max_batch_tokens):
                self._run_jobs(jobs, results, chunk)
            return results

    def _run_jobs(self, jobs: Sequence[_Job], results: list[list[float]], chunk: int) -> None:
        import torch

        rows: list[PackedRow] = []
        heads: dict[int, int] = {}  # group id -> its head's row in this pass
        scored: list[tuple[int, _Job]] = []
        for job in jobs:
            group = job.group
            if job.tail is None:
                heads[id(group)] = len(rows)
                rows.append(
                    PackedRow(
                        group.prefix.kv,
                        len(group.prefix.ids),
                        group.head,
                        keep_kv=job.keep,
                        score=False,
                    )
                )
                continue
            tail = group.tails[job.tail]
            parent = heads.get(id(group))
            scored.append((len(rows), job))
            if parent is not None:
                rows.append(PackedRow(None, 0, tail, parent=parent))
            else:
                base = group.kept if group.kept is not None else group.prefix
                rows.append(PackedRow(base.kv, len(base.ids), tail))
        assert self.engine is not None
        outputs = self.engine.forward(rows, chunk_tokens=chunk)
        for job, output in zip(jobs, outputs, strict=True):
            if job.tail is None and job.keep:
                group = job.group
                group.kept = _Prefix(group.prefix.ids + tuple(group.head), output)
        if scored:
            hidden = torch.stack([outputs[row] for row, _ in scored])
            scores: list[float] = torch.sigmoid(hidden.float() @ self.head + self.bias).tolist()
            for (_, job), score in zip(scored, scores, strict=True):
                assert job.tail is not None
                results[job.group.position][job.tail] = score

    def _score_transformers(
        self, calls: Sequence[tuple[tuple[int, ...], list[list[int]]]], *, max_batch_tokens: int
    ) -> list[list[float]]:
        """transformers' forward (models the packed engine does not cover): the query
        part of each call in a pass of its own (its KV kept), then the documents in
        length-sorted, padding-bounded batches resting on it. A model with other than
        full-attention layers runs every sequence whole (no cached prefix)."""
        import torch

        if not self.reuses_prefixes:
            return self._score_whole(calls, max_batch_tokens=max_batch_tokens)
        with inference(), torch.inference_mode():
            shared, shared_rows, shared_owners = [], [], []
            for position, (instruction, sequences) in enumerate(calls):
                if not sequences:
                    shared.append(_EMPTY_PREFIX)
                    continue
                base = self._instruction_prefix(instruction)
                first = sequences[0]
                common, reuse = _shared_lengths(base.ids, sequences)
                shared.append(base.crop(reuse))
                # A lone document gains nothing from a separate pass over its query.
                if len(sequences) > 1 and common > reuse:
                    shared_rows.append(_Row(base.crop(reuse), first[reuse:common]))
                    shared_owners.append(position)
            for position, prefix in zip(
                shared_owners,
                self._run(shared_rows, max_batch_tokens, keep_kv=True),
                strict=True,
            ):
                assert isinstance(prefix, _Prefix)
                shared[position] = prefix

            rows, owners = [], []
            for position, (_, sequences) in enumerate(calls):
                prefix = shared[position]
                for index, sequence in enumerate(sequences):
                    rows.append(_Row(prefix, sequence[len(prefix.ids) :]))
                    owners.append((position, index))
            results: list[list[float]] = [[0.0] * len(sequences) for _, sequences in calls]
            for (position, index), score in zip(
                owners, self._run(rows, max_batch_tokens, keep_kv=False), strict=True
            ):
                assert isinstance(score, float)
                results[position][index] = score
            return results

    def _score_whole(
        self, calls: Sequence[tuple[tuple[int, ...], list[list[int]]]], *, max_batch_tokens: int
    ) -> list[list[float]]:
        """Every sequence run whole by transformers' forward, in length-sorted,
        padding-bounded batches."""
        import torch

        rows = [_Row(_EMPTY_PREFIX, sequence) for _, sequences in calls for sequence in sequences]
        with inference(), torch.inference_mode():
            scores = iter(self._run(rows, max_batch_tokens, keep_kv=False))
        results = []
        for _, sequences in calls:
            call_scores = []
            for _ in sequences:
                score = next(scores)
                assert isinstance(score, float)
                call_scores.append(score)
            results.append(call_scores)
        return results

    def _instruction_prefix(self, ids: tuple[int, ...]) -> _Prefix:
        """The KV cache of a system prompt + instruction part (kept for the last
        :data:`_INSTRUCTION_CACHE_SIZE` instructions used)."""
        cached = self._instructions.get(ids)
        if cached is not None:
            self._instructions.move_to_end(ids)
            return cached
        with inference():
            (prefix,) = self._run([_Row(_EMPTY_PREFIX, list(ids))], max(len(ids), 1), keep_kv=True)
        assert isinstance(prefix, _Prefix)
        self._instructions[ids] = prefix
        if len(self._instructions) > _INSTRUCTION_CACHE_SIZE:
            self._instructions.popitem(last=False)
        return prefix

    def _run(
        self, rows: Sequence[_Row], max_batch_tokens: int, *, keep_kv: bool
    ) -> list[float | _Prefix]:
        """Run rows in length-sorted, token-budget batches; each row gives its score
        or (``keep_kv``) its prefix extended by its own tokens."""
        out: list[float | _Prefix] = [0.0] * len(rows)
        lengths = [len(row.prefix.ids) + len(row.ids) for row in rows]
        widths = [len(row.ids) for row in rows]
        for budget_batch in budget_batches(lengths, max_tokens=max_batch_tokens):
            check_stop()  # a latency budget stops the call between batches
            # Packed rows run no padding: only transformers' padded batches are split.
            batches = (
                [budget_batch]
                if self.engine is not None
                else limit_padding(
                    budget_batch, widths, max_padding=_MAX_PADDING, min_tokens=_MIN_BATCH_TOKENS
                )
            )
            for batch in batches:
                for index, value in zip(
                    batch, self._forward([rows[i] for i in batch], keep_kv), strict=True
                ):
                    out[index] = value
        return out

    def _forward(self, rows: Sequence[_Row], keep_kv: bool) -> list[float | _Prefix]:
        import torch

        if self.engine is not None:
            packed = [
                PackedRow(
                    row.prefix.kv, len(row.prefix.ids), row.ids, keep_kv=keep_kv, score=not keep_kv
                )
                for row in rows
            ]
            outputs = self.engine.forward(packed, chunk_tokens=CHUNK_TOKENS)
            if keep_kv:
                return [
                    _Prefix(row.prefix.ids + tuple(row.ids), kv)
                    for row, kv in zip(rows, outputs, strict=True)
                ]
            hidden = torch.stack(outputs)
            engine_scores: list[float] = torch.sigmoid(
                hidden.float() @ self.head + self.bias
            ).tolist()
            return list(engine_scores)
        return self._forward_transformers(rows, keep_kv)

    def _forward_transformers(self, rows: Sequence[_Row], keep_kv: bool) -> list[float | _Prefix]:
        import torch
        from transformers import DynamicCache

        size = len(rows)
        width = max(len(row.ids) for row in rows)
        input_ids = torch.zeros((size, width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
        past = max(len(row.prefix.ids) for row in rows)
        first = rows[0].prefix
        cache = attention_mask = position_ids = None
        # Rows are right-padded: a real token never attends to the padding after it,
        # so no padding mask is needed unless the rows' cached prefixes differ.
        if past and all(row.prefix is first for row in rows):
            assert first.kv is not None
            cache = DynamicCache(
                [(k.expand(size, -1, -1, -1), v.expand(size, -1, -1, -1)) for k, v in first.kv]
            )
        elif past:
            cache = DynamicCache(self._stack_prefixes(rows, past))
            attention_mask = torch.ones((size, past + width), dtype=torch.long)
            offsets = torch.tensor([len(row.prefix.ids) for row in rows])
            for i, offset in enumerate(offsets.tolist()):
                attention_mask[i, offset:past] = 0
            position_ids = offsets[:, None] + torch.arange(width)[None, :]
        if cache is not None and not keep_kv:
            _read_only(cache)
        output = self.decoder(
            input_ids=input_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            position_ids=None if position_ids is None else position_ids.to(self.device),
            use_cache=keep_kv or cache is not None,
            **{self._cache_argument: cache},
        )
        if keep_kv:
            kept = getattr(output, "cache", None)
            layers = (kept if kept is not None else output.past_key_values).layers
            prefixes: list[float | _Prefix] = []
            for i, row in enumerate(rows):
                kv = []
                for layer_index, layer in enumerate(layers):
                    new_k = layer.keys[i : i + 1, :, past : past + len(row.ids)]
                    new_v = layer.values[i : i + 1, :, past : past + len(row.ids)]
                    if row.prefix.kv is not None:
                        old_k, old_v = row.prefix.kv[layer_index]
                        new_k, new_v = torch.cat([old_k, new_k], -2), torch.cat([old_v, new_v], -2)
                    kv.append((new_k.contiguous().clone(), new_v.contiguous().clone()))
                prefixes.append(_Prefix(row.prefix.ids + tuple(row.ids), kv))
            return prefixes
        last = torch.tensor([len(row.ids) - 1 for row in rows], device=self.device)
        hidden = output.last_hidden_state[torch.arange(size, device=self.device), last]
        logits = hidden.float() @ self.head + self.bias
        scores: list[float] = torch.sigmoid(logits).tolist()
        return list(scores)

    @staticmethod
    def _stack_prefixes(rows: Sequence[_Row], past: int) -> _KV:
        """Different cached prefixes in one batch, each left-aligned and padded to
        ``past`` positions (the padding is masked out)."""
        template = next(row.prefix.kv for row in rows if row.prefix.kv is not None)
        assert template is not None
        stacked: _KV = []
        for layer_index, (k, v) in enumerate(template):
            keys = k.new_zeros((len(rows), k.shape[1], past, k.shape[3]))
            values = v.new_zeros((len(rows), v.shape[1], past, v.shape[3]))
            for i, row in enumerate(rows):
                if row.prefix.kv is not None:
                    row_k, row_v = row.prefix.kv[layer_index]
                    keys[i, :, : row_k.shape[2]] = row_k[0]
                    values[i, :, : row_v.shape[2]] = row_v[0]
            stacked.append((keys, values))
        return stacked


def _concatenate(
    layer: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)


def _read_only(cache: Any) -> None:
    """Make a prefix cache hand each layer the prefix plus the new keys and values
    without keeping the new ones: a scoring pass never needs them again, and keeping
    them for every layer would hold a whole batch's KV (~0.9 GiB per 8k tokens in
    bf16 for Qwen3-0.6B) until the pass ends."""
    for layer in cache.layers:
        layer.update = functools.partial(_concatenate, layer)


def _token_id(tokenizer: Any, token: str, model: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ModelLoadError(
            f"The tokenizer of {model!r} has no {token!r} token; QwenReranker needs a "
            "Qwen3-Reranker-style model that answers 'yes' or 'no'."
        )
    return int(token_id)


def _load_tokens(model: str) -> _QwenTokens:
    """The model's tokenizer: read from its ``tokenizer.json`` where that gives
    transformers' ids (see :func:`.tokenizer_file.open_tokenizer_file`; transformers is
    then never imported), else through ``AutoTokenizer``."""
    tokenizer: Any = open_tokenizer_file(model)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    return _QwenTokens(tokenizer, model)


def _load_scorer(
    model: str, device: torch.device, dtype: torch.dtype, tokens: _QwenTokens
) -> _QwenScorer:
    """The model, for scoring. On CPU, a checkpoint the packed engine covers (see
    :func:`~memos_rerank_integrations._engine.checkpoint.open_qwen3`) is read from its
    files straight into the engine (no transformers model is built, nothing is held
    twice); other checkpoints and devices load through transformers."""
    if device.type == "cpu":
        checkpoint = open_qwen3(model)
        if checkpoint is not None:
            with checkpoint:
                engine = checkpoint_engine(checkpoint, dtype)
                if engine is not None:
                    rows = checkpoint.output_rows([tokens.yes, tokens.no]).to(dtype).float()
                    return _QwenScorer(tokens, None, rows[0] - rows[1], 0.0, device, engine=engine)
    return _load_transformers_scorer(model, device, dtype, tokens)


def _load_transformers_scorer(
    model: str, device: torch.device, dtype: torch.dtype, tokens: _QwenTokens
) -> _QwenScorer:
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_option = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        model,
        attn_implementation="sdpa",
        output_loading_info=True,
        ignore_mismatched_sizes=True,
        **{dtype_option: dtype},
    )
    lm, report = loaded
    _refuse_other_heads(model, lm.config, report)
    lm.to(device)
    lm.eval()
    lm.requires_grad_(False)
    output = lm.get_output_embeddings()
    yes, no = tokens.yes, tokens.no
    head = (output.weight[yes].float() - output.weight[no].float()).detach().clone()
    bias = 0.0
    if getattr(output, "bias", None) is not None:
        bias = float(output.bias[yes].float() - output.bias[no].float())
    return _QwenScorer(tokens, lm.get_decoder(), head, bias, device)


def _check_instruction(instruction: object) -> str:
    """The instruction to use: ``None`` is the model card's; a str longer than
    :data:`MAX_INSTRUCTION_LENGTH` characters, one holding a lone surrogate, or
    anything else is an :class:`InvalidInputError`."""
    if instruction is None:
        return DEFAULT_INSTRUCTION
    if not isinstance(instruction, str):
        raise InvalidInputError(
            f"instruction must be a str or None, got {type(instruction).__name__}."
        )
    if len(instruction) > MAX_INSTRUCTION_LENGTH:
        raise InvalidInputError(
            f"instruction is {len(instruction)} characters long; at most "
            f"{MAX_INSTRUCTION_LENGTH} are accepted (the model card's has "
            f"{len(DEFAULT_INSTRUCTION)})."
        )
    check_text("The instruction", instruction)
    return instruction


def _refuse_other_heads(model: str, config: Any, report: Any) -> None:
    """A checkpoint QwenReranker would score at random or without meaning is a
    :class:`ModelLoadError`: one missing weights of the causal LM (they would be
    initialised at random), or a sequence-classification checkpoint (e.g. a
    Qwen3-Reranker "-seq-cls" conversion), whose LM head is not the one it was
    trained with (with tied embeddings it loads without a missing weight)."""
    refuse_untrained_weights(model, config, report, reranker="QwenReranker")
    architecture = checkpoint_architecture(config)
    if architecture is not None and architecture.endswith("ForSequenceClassification"):
        raise ModelLoadError(
            f"Model {model!r} ({architecture}) is a sequence-classification checkpoint: "
            "QwenReranker reads the answer from a causal LM's yes/no logits, which this "
            "checkpoint was not trained to give: use CrossEncoderReranker (backend "
            "'cross-encoder')."
        )


class QwenReranker(LocalReranker):
    """Rerank with a Qwen3-Reranker model (or a fine-tune such as MemReranker) locally.

    Scores are the model card's ``P("yes")`` in [0, 1], equal to its transformers
    recipe (within 1e-4 in float32), computed with far less work: cached prompt
    prefixes, a two-row output head and token-budget batches (see the module docs).

    Args:
        model: a Hugging Face Hub id or a local directory. Loaded on first use and
            shared by every reranker in the process with the same model, device and dtype.
            On CPU a Qwen3 checkpoint in safetensors that the packed engine covers is
            read straight from its files (no transformers model is built); others load
            through transformers.
        instruction: the ``<Instruct>`` text (default: the model card's web-search one),
            at most :data:`MAX_INSTRUCTION_LENGTH` characters; on first use, with the
            prompt's fixed parts it must leave room for the query and document within
            ``max_length`` tokens (else :class:`InvalidInputError`, before the weights load).
        max_length: the most tokens of one prompt; only the document's tail is cut.
        device: ``"cuda"``, ``"mps"``, ``"cpu"``...; ``None`` picks CUDA, then MPS,
            then CPU when the model loads.
        dtype: a ``torch.dtype`` or its name; ``None`` picks bfloat16 where the hardware
            has native bf16 matrix units, else float32.
        max_query_length: cut queries to this many tokens (``None``: never; the
            recipe does not cut queries, so scores match it only when nothing is cut).
        max_batch_tokens: token budget of one forward pass (packed tokens; a longer
            row runs in a pass of its own, in chunks): bounds activation memory. A long
            document still holds one layer's keys/values and its residual stream per
            token (the least an exact score needs).
        thresholds: cut points that map scores onto :class:`Stage`.
    """

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        *,
        instruction: str | None = None,
        max_length: int = 8192,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_query_length: int | None = None,
        max_batch_tokens: int = 8192,
        thresholds: StageThresholds = DEFAULT_THRESHOLDS,
    ) -> None:
        if not isinstance(model, (str, Path)) or not str(model):
            raise InvalidInputError(f"model must be a Hub id or a local directory, got {model!r}.")
        instruction = _check_instruction(instruction)
        if not isinstance(thresholds, StageThresholds):
            raise InvalidInputError(
                f"thresholds must be a StageThresholds, got {type(thresholds).__name__}."
            )
        require_local("QwenReranker")
        self.model = str(model)
        self.instruction = instruction
        self.max_length = positive_int("max_length", max_length)
        self.max_query_length = optional_positive_int("max_query_length", max_query_length)
        self.max_batch_tokens = positive_int("max_batch_tokens", max_batch_tokens)
        self.device = device
        self.dtype = dtype
        self.thresholds = thresholds
        # Not picklable, rebuilt on first use: the shared tokenizer (with its lock) and
        # the shared loaded model (with its lock and KV caches).
        self._tokens: _QwenTokens | None = None
        self._scorer: _QwenScorer | None = None

    def __repr__(self) -> str:
        return f"QwenReranker(model={self.model!r}, device={self.device!r}, dtype={self.dtype!r})"

    def replica(self) -> QwenReranker:
        """A twin of this reranker (same settings) on the same loaded weights, with a
        lock of its own, so the two score at the same time on two threads, each in the
        share of the cores that thread's torch uses: what ``memos-rerank serve
        --model-workers`` runs. Loads the model if it is not loaded yet. Where the
        packed engine does not run the model (transformers' modules do), the twin shares
        this reranker's lock and their calls take turns."""
        scorer = self._loaded()
        twin = copy.copy(self)
        twin._tokens, twin._scorer = scorer.tokens, scorer.replica()
        return twin

    def _tokenizer(self) -> _QwenTokens:
        """The tokenizer, loaded (and shared per model) without the weights."""
        if self._tokens is None:
            key = model_cache_key("qwen-tokenizer", self.model, _NO_DEVICE, _NO_DTYPE)
            self._tokens = load_shared(
                key, lambda: _load_tokens(self.model), model=self.model, exclusive=False
            )
        return self._tokens

    def _loaded(self) -> _QwenScorer:
        if self._scorer is None:
            device = resolve_device(self.device)
            dtype = resolve_dtype(self.dtype, device)
            key = model_cache_key("qwen-yes-no", self.model, device, dtype)
            tokens = self._tokenizer()
            self._scorer = load_shared(
                key, lambda: _load_scorer(self.model, device, dtype, tokens), model=self.model
            )
        return self._scorer

    def _tokenize(
        self, tokens: _QwenTokens, calls: Sequence[tuple[str, list[str]]]
    ) -> list[_CallTokens]:
        with tokens.lock:
            return [
                tokens.tokenize(
                    self.instruction,
                    query,
                    documents,
                    max_length=self.max_length,
                    max_query_length=self.max_query_length,
                )
                for query, documents in calls
            ]

    def count_tokens(self, query: str, documents: Sequence[str]) -> int:
        """The prompt tokens a :meth:`rerank` of these inputs scores: the sum over
        documents of the model card recipe's sequence length (prompt prefix, body cut
        to ``max_length`` with the query cut to ``max_query_length``, suffix).

        Tokenization only (the weights are not loaded for it), bounded like
        :meth:`rerank`'s: a long query or document costs what can fit, not its length.
        """
        return super().count_tokens(query, documents)

    def _count_tokens(self, query: str, documents: list[str]) -> int:
        (call,) = self._tokenize(self._tokenizer(), [(query, documents)])
        return call.count()

    def _score_calls(self, calls: list[tuple[str, list[str]]]) -> list[list[float]]:
        # Tokenized before the weights load, so that an instruction or max_length that
        # cannot work is reported without loading them.
        tokenized = self._tokenize(self._tokenizer(), calls)
        scorer = self._loaded()
        with scorer.tokens.lock:
            instruction = scorer.tokens.instruction_ids(self.instruction)
        with scorer.lock:
            return scorer.score(
                [(instruction, call.sequences()) for call in tokenized],
                max_batch_tokens=self.max_batch_tokens,
            )
