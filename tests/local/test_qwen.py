"""QwenReranker: exact against the model card recipe, and doing less work than it."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memos_rerank_integrations import (
    InvalidInputError,
    ModelLoadError,
    QwenReranker,
    RerankResult,
    Stage,
    StageThresholds,
)
from memos_rerank_integrations._engine.batching import limit_padding
from memos_rerank_integrations._engine.qwen3 import PackedRow
from memos_rerank_integrations._local import runtime as local_runtime
from memos_rerank_integrations._local.qwen import MAX_INSTRUCTION_LENGTH, _Prefix, _Row
from memos_rerank_integrations._local.runtime import resolve_dtype
from memos_rerank_integrations._qwen_prompt import PROMPT_PREFIX, PROMPT_SUFFIX

from ..support import qwen_fixtures as _qwen_fixtures
from ..support.backends import MEMOS_EXAMPLES
from ..support.checkpoints import without_weights
from ..support.qwen_fixtures import ModelCardRecipe, by_index

EXAMPLES = MEMOS_EXAMPLES
TOLERANCE = 1e-4

tiny_qwen_dir = _qwen_fixtures.tiny_qwen_dir
tiny_qwen_nopad_dir = _qwen_fixtures.tiny_qwen_nopad_dir
qwen_recipe = _qwen_fixtures.qwen_recipe

INPUTS = [
    pytest.param(example["query"], example["documents"], None, id=f"memos-example-{i}")
    for i, example in enumerate(EXAMPLES)
] + [
    pytest.param(
        "用户喜欢什么酒？",
        ["用户喜欢喝酱香型白酒，比如茅台。", "Café naïve — 🙂", "ümlaut\tand\ttabs\n\nnewlines"],
        None,
        id="unicode",
    ),
    pytest.param("", ["", " ", "User likes playing badminton."], None, id="empty-strings"),
    pytest.param("  leading space?", ["\nstarts with a newline", " space", "."], None, id="spaces"),
    pytest.param("42", ["2024-05-01", "10:30", "yes", "no"], None, id="digits-yes-no"),
    pytest.param(
        "What are the user's hobbies?",
        ["User likes playing badminton.", "User likes playing badminton. Also chess."],
        "Retrieve memories about the user's personal preferences",
        id="custom-instruction",
    ),
    pytest.param("q", ["doc"], "", id="empty-instruction"),
    pytest.param("q", ["doc", "doc2"], "Ends with a newline\n", id="instruction-newline"),
    pytest.param("same", ["same", "same", "same"], None, id="identical-documents"),
]


def _sequences(
    scorer: Any,
    instruction: str,
    query: str,
    documents: list[str],
    *,
    max_length: int,
    max_query_length: int | None,
) -> list[list[int]]:
    """The exact token ids the loaded model scores for a call (the recipe's)."""
    with scorer.tokens.lock:
        call = scorer.tokens.tokenize(
            instruction, query, documents, max_length=max_length, max_query_length=max_query_length
        )
    return call.sequences()


def scores_of(reranker: QwenReranker, query: str, documents: list[str]) -> list[float]:
    return by_index(reranker.rerank(query, documents))


@pytest.fixture(scope="module")
def fp32(tiny_qwen_dir: Path) -> QwenReranker:
    return QwenReranker(tiny_qwen_dir, dtype="float32", device="cpu")


class TokenCounter:
    """Records every forward pass of a model's packed engine: the token ids of each of
    its rows (``batches``, one list of rows per pass) and the rows themselves
    (``passes``), checked against the ids its embedding layer really saw."""

    def __init__(self, reranker: QwenReranker) -> None:
        self.passes: list[list[PackedRow]] = []
        self.chunks: list[int] = []
        self._embedded: list[list[int]] = []
        scorer = reranker._loaded()
        assert scorer.engine is not None
        self._engine = scorer.engine
        forward = self._engine.forward

        def recorded(rows: Any, **kwargs: Any) -> Any:
            seen = len(self._embedded)
            output = forward(rows, **kwargs)
            ran = [token for embedded in self._embedded[seen:] for token in embedded]
            assert ran == [token for row in rows for token in row.ids]
            self.passes.append(list(rows))
            self.chunks.append(kwargs["chunk_tokens"])
            return output

        self._engine.forward = recorded  # type: ignore[method-assign]
        self._handle = scorer.engine.embed_tokens.register_forward_pre_hook(self._record)

    def _record(self, module: Any, args: tuple[torch.Tensor, ...]) -> None:
        self._embedded.append(args[0].flatten().tolist())

    @property
    def batches(self) -> list[list[list[int]]]:
        return [[list(row.ids) for row in rows] for rows in self.passes]

    def clear(self) -> None:
        self.passes.clear()
        self.chunks.clear()

    def close(self) -> None:
        self._handle.remove()
        del self._engine.forward


@pytest.fixture
def counter(fp32: QwenReranker) -> Iterator[TokenCounter]:
    counting = TokenCounter(fp32)
    yield counting
    counting.close()


# -- exactness -------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "documents", "instruction"), INPUTS)
def test_scores_equal_model_card_recipe(
    tiny_qwen_dir: Path,
    qwen_recipe: ModelCardRecipe,
    query: str,
    documents: list[str],
    instruction: str | None,
) -> None:
    reranker = QwenReranker(tiny_qwen_dir, instruction=instruction, dtype=torch.float32)
    expected = qwen_recipe(query, documents, instruction)
    got = scores_of(reranker, query, documents)
    assert got == pytest.approx(expected, abs=TOLERANCE)
    # A second call reuses the cached instruction prefix and must not drift.
    assert scores_of(reranker, query, documents) == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("max_length", [70, 75, 90, 128])
def test_truncation_cuts_only_the_document_tail(tiny_qwen_dir: Path, max_length: int) -> None:
    recipe = ModelCardRecipe(tiny_qwen_dir, max_length=max_length)
    reranker = QwenReranker(tiny_qwen_dir, dtype="float32", max_length=max_length)
    long_document = "User is going on a business trip to Beijing next Wednesday. " * 20
    documents = [long_document, "User likes playing badminton.", long_document[:150], "x"]
    query = "Where is the user travelling next week, and when?"
    assert scores_of(reranker, query, documents) == pytest.approx(
        recipe(query, documents), abs=TOLERANCE
    )
    # The prompt really was cut (else this test proves nothing about truncation).
    full = ModelCardRecipe(tiny_qwen_dir)
    assert recipe(query, documents[:1])[0] != pytest.approx(full(query, documents[:1])[0], abs=1e-6)


def test_documents_longer_than_default_max_length(
    fp32: QwenReranker, qwen_recipe: ModelCardRecipe
) -> None:
    huge = "The quick brown fox jumps over the lazy dog; " * 1000  # ~9-10k tokens
    tokens = len(qwen_recipe.tokenizer.encode(huge, add_special_tokens=False))
    assert tokens > 8192
    documents = [huge, "A short memory.", huge[::-1]]
    query = "Which animal jumps?"
    assert scores_of(fp32, query, documents) == pytest.approx(
        qwen_recipe(query, documents), abs=TOLERANCE
    )


text = st.text(
    alphabet=st.sampled_from(list("abcyesno UQD<>:?!.,'\n\t-0123456789é茅台🙂")), max_size=40
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    query=text,
    documents=st.lists(text, min_size=1, max_size=5),
    instruction=st.one_of(st.none(), text),
)
def test_scores_equal_recipe_on_generated_inputs(
    tiny_qwen_dir: Path,
    qwen_recipe: ModelCardRecipe,
    query: str,
    documents: list[str],
    instruction: str | None,
) -> None:
    reranker = QwenReranker(tiny_qwen_dir, instruction=instruction, dtype="float32")
    assert scores_of(reranker, query, documents) == pytest.approx(
        qwen_recipe(query, documents, instruction), abs=TOLERANCE
    )


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    calls=st.lists(
        st.tuples(text, st.lists(text, max_size=4), st.one_of(st.none(), st.integers(1, 3))),
        min_size=1,
        max_size=5,
    )
)
def test_rerank_many_equals_rerank_per_call(
    fp32: QwenReranker, calls: list[tuple[str, list[str], int | None]]
) -> None:
    together = fp32.rerank_many(calls)
    separately = [fp32.rerank(query, documents, top_n) for query, documents, top_n in calls]
    assert [[r.index for r in call] for call in together] == [
        [r.index for r in call] for call in separately
    ]
    for got, expected in zip(together, separately, strict=True):
        assert [r.score for r in got] == pytest.approx([r.score for r in expected], abs=TOLERANCE)


async def test_arerank_many_runs_off_the_event_loop_and_equals_rerank_many(
    fp32: QwenReranker,
) -> None:
    calls = [("hobbies?", ["badminton", "baijiu"], None), ("drinks?", [], 2), ("x", ["y"], 1)]
    loop_thread = threading.get_ident()
    threads: list[int] = []
    original = fp32._score_calls

    def watched(pending: list[tuple[str, list[str]]]) -> list[list[float]]:
        threads.append(threading.get_ident())
        return original(pending)

    fp32._score_calls = watched  # type: ignore[method-assign]
    try:
        together = await fp32.arerank_many(calls)
    finally:
        del fp32._score_calls
    assert threads and loop_thread not in threads
    assert together == fp32.rerank_many(calls)


def test_rerank_many_mixes_calls_in_one_forward_pass(
    fp32: QwenReranker, qwen_recipe: ModelCardRecipe, counter: TokenCounter
) -> None:
    fp32.rerank("warm the instruction cache", ["x"])
    counter.clear()
    calls = [
        ("Any liquor recommendations for me?", ["User prefers baijiu.", "I don't drink."], None),
        ("What are the user's hobbies?", ["User likes playing badminton."], 1),
        ("Where does the user work?", ["Hangzhou.", "A backend developer", "Beijing"], 2),
    ]
    results = fp32.rerank_many(calls)
    for (query, documents, top_n), got in zip(calls, results, strict=True):
        expected = qwen_recipe(query, documents)
        best = sorted(range(len(documents)), key=lambda i: -expected[i])[:top_n]
        assert [r.index for r in got] == best
        assert [r.score for r in got] == pytest.approx([expected[i] for i in best], abs=TOLERANCE)
    # One pass in all: the two multi-document calls' queries (each run once, as a row
    # its call's documents attend to) and all six documents.
    (rows,) = counter.passes
    queries = [row for row in rows if not row.score]
    documents = [row for row in rows if row.score]
    assert len(queries) == 2 and len(documents) == 6
    assert sum(row.parent is not None for row in documents) == 5  # the lone one rests on none


# -- doing less work ---------------------------------------------------------------------


def test_system_prompt_runs_once_across_calls(fp32: QwenReranker, counter: TokenCounter) -> None:
    scorer = fp32._loaded()
    instruction_ids = scorer.tokens.tokenizer.encode(fp32.instruction, add_special_tokens=False)
    fp32.rerank("first query", ["a memory"])
    counter.clear()
    memory = "User prefers Jiangxiang-flavored baijiu, like Moutai."
    queries = ("Any liquor recommendations for me?", "What are my food preferences?")
    for query in queries:
        fp32.rerank(query, [memory])
    assert len(counter.batches) == len(queries)
    for query, batch in zip(queries, counter.batches, strict=True):
        (full,) = _sequences(
            scorer, fp32.instruction, query, [memory], max_length=8192, max_query_length=None
        )
        (row,) = batch
        # Only the query, the memory and the suffix run: never the system prompt or instruction.
        assert len(row) <= len(full) - len(scorer.tokens.prefix_ids) - len(instruction_ids)
        assert row == full[-len(row) :]


def test_query_runs_once_per_call_not_per_document(
    fp32: QwenReranker, counter: TokenCounter
) -> None:
    query = "Which of these memories mention badminton or baijiu?"
    documents = [f"Memory {i}: user likes playing badminton." for i in range(6)]
    fp32.rerank("warm", ["x"])
    counter.clear()
    fp32.rerank(query, documents)
    query_ids = fp32._loaded().tokens.tokenizer.encode(query, add_special_tokens=False)
    core = query_ids[1:-1]  # away from BPE boundaries

    def contains(row: list[int]) -> bool:
        return any(row[i : i + len(core)] == core for i in range(len(row)))

    rows = [row for batch in counter.batches for row in batch]
    assert sum(contains(row) for row in rows) == 1
    assert len(rows) == 1 + len(documents)


def test_token_budget_bounds_every_batch(tiny_qwen_dir: Path, qwen_recipe: ModelCardRecipe) -> None:
    reranker = QwenReranker(tiny_qwen_dir, dtype="float32", max_batch_tokens=300)
    counting = TokenCounter(reranker)
    try:
        documents = [("word " * n).strip() for n in (1, 40, 3, 25, 7, 60, 2, 15, 90, 30)]
        query = "How many words?"
        reranker.rerank("warm", ["x"])
        counting.clear()
        got = scores_of(reranker, query, documents)
        single = list(counting.passes)
        # Several calls, each small enough for one pass, share passes up to the budget.
        counting.clear()
        short = [document for document in documents if len(document) < 40]
        calls = [(f"Call {i}: how many words?", short[i % 2 :], None) for i in range(6)]
        together = reranker.rerank_many(calls)
        fused = list(counting.passes)
    finally:
        counting.close()
    assert got == pytest.approx(qwen_recipe(query, documents), abs=TOLERANCE)
    for (call_query, call_documents, _), results in zip(calls, together, strict=True):
        expected = qwen_recipe(call_query, call_documents)
        assert by_index(results) == pytest.approx(expected, abs=TOLERANCE)
    fused_documents = sum(len(call[1]) for call in calls)
    for passes, scored in ((single, len(documents)), (fused, fused_documents)):
        assert len(passes) > 1
        # Packed rows, no padding: every pass runs at most the budget's tokens.
        for rows in passes:
            assert sum(len(row.ids) for row in rows) <= 300
        # Every document ran exactly once.
        assert sum(row.score for rows in passes for row in rows) == scored
    assert len(fused) < len(calls)  # calls really were packed together


# -- memory bounded by the token budget, at any length ------------------------------------

LONG_DOCUMENT = "User is going on a business trip to Beijing next Wednesday. " * 40


@pytest.mark.parametrize("budget", [16, 64, 150])
@pytest.mark.parametrize(
    "query", ["Where is the user going?", "Where is the user going, and when? " * 8]
)
def test_documents_longer_than_the_batch_budget_score_like_the_recipe(
    tiny_qwen_dir: Path, qwen_recipe: ModelCardRecipe, budget: int, query: str
) -> None:
    """Rows longer than max_batch_tokens run in chunks of at most that many tokens;
    a call too big for one pass is split (its query kept, or run again when long)."""
    reranker = QwenReranker(tiny_qwen_dir, dtype="float32", max_batch_tokens=budget)
    documents = [LONG_DOCUMENT, "User likes tea.", LONG_DOCUMENT[:300], "x", LONG_DOCUMENT[::-1]]
    reranker.rerank("warm", ["x"])
    counting = TokenCounter(reranker)
    try:
        got = scores_of(reranker, query, documents)
    finally:
        counting.close()
    assert got == pytest.approx(qwen_recipe(query, documents), abs=TOLERANCE)
    assert len(qwen_recipe.sequences(query, documents)[0]) > 3 * budget  # the premise
    assert counting.chunks and max(counting.chunks) <= budget
    for rows in counting.passes:
        scored = [row for row in rows if row.score]
        # At most the budget per pass, unless one document alone is longer.
        assert sum(len(row.ids) for row in rows) <= budget or len(scored) == 1
    query_runs = sum(not row.score for rows in counting.passes for row in rows)
    query_tokens = [len(row.ids) for rows in counting.passes for row in rows if not row.score]
    if query_tokens and query_tokens[0] <= budget // 4:
        assert query_runs == 1  # kept from its first pass for the later ones
    assert sum(row.score for rows in counting.passes for row in rows) == len(documents)


@pytest.mark.parametrize("chunk", [1, 2, 5, 13])
def test_a_pass_in_chunks_equals_the_pass_in_one(fp32: QwenReranker, chunk: int) -> None:
    """Chunk boundaries anywhere (inside a query row, a document, a kept row) change
    nothing: each chunk sees every earlier chunk's keys and values."""
    scorer = fp32._loaded()
    engine = scorer.engine
    assert engine is not None
    base = scorer._instruction_prefix(scorer.tokens.instruction_ids(fp32.instruction))
    text = "some query tokens and some document tokens"
    ids = scorer.tokens.tokenizer.encode(text, add_special_tokens=False)
    rows = [
        PackedRow(base.kv, len(base.ids), ids[:7], keep_kv=False, score=False),
        PackedRow(None, 0, ids[3:12], parent=0),
        PackedRow(None, 0, ids[:1], parent=0),
        PackedRow(base.kv, len(base.ids), ids[2:9]),
        PackedRow(None, 0, ids[5:16], keep_kv=True, score=False),
        PackedRow(None, 0, ids[1:6], parent=0),
    ]
    with torch.inference_mode():
        whole = engine.forward(rows, chunk_tokens=10**6)
        chunked = engine.forward(rows, chunk_tokens=chunk)
    assert whole[0] is None and chunked[0] is None
    for i in (1, 2, 3, 5):
        torch.testing.assert_close(chunked[i], whole[i], atol=1e-5, rtol=1e-4)
    for (k1, v1), (k2, v2) in zip(chunked[4], whole[4], strict=True):
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4)


def test_attention_without_the_fused_cpu_kernel_scores_like_the_recipe(
    tiny_qwen_dir: Path, qwen_recipe: ModelCardRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attention other devices get (plain softmax, keys in blocks) is exact too."""
    from memos_rerank_integrations._engine import qwen3 as _qwen_engine

    reranker = QwenReranker(tiny_qwen_dir, dtype="float32", max_batch_tokens=64)
    engine = reranker._loaded().engine
    assert engine is not None
    monkeypatch.setattr(engine, "_flash", None)
    monkeypatch.setattr(_qwen_engine, "_KEY_BLOCK", 5)
    query, documents = "Where is the user going?", [LONG_DOCUMENT[:400], "User likes tea.", "x"]
    assert scores_of(reranker, query, documents) == pytest.approx(
        qwen_recipe(query, documents), abs=TOLERANCE
    )


@pytest.mark.parametrize("group_queries", [0, 128, 7], ids=["long", "grouped", "small-groups"])
@pytest.mark.parametrize("budget", [150, 4096])
def test_masked_attention_calls_score_like_the_recipe(
    tiny_qwen_dir: Path,
    qwen_recipe: ModelCardRecipe,
    monkeypatch: pytest.MonkeyPatch,
    budget: int,
    group_queries: int,
) -> None:
    """A piece of many queries with a short context attends in one masked call over
    its context and own keys joined (its earlier chunks' keys included when a row
    spans chunks), and, where ``group_queries`` is set, short pieces sharing a
    context attend together in such calls (the last layer's last tokens too),
    instead of in parts merged; every way equals the recipe."""
    from memos_rerank_integrations._engine import qwen3 as _qwen_engine

    query = "Where is the user going?"
    documents = [LONG_DOCUMENT[:1300], "User likes tea.", LONG_DOCUMENT[200:700], "x"]
    documents += [f"Memory {i}: the user went to Beijing." for i in range(6)]
    reference = qwen_recipe(query, documents)
    reranker = QwenReranker(tiny_qwen_dir, dtype="float32", max_batch_tokens=budget)
    engine = reranker._loaded().engine
    assert engine is not None
    if engine._flash is None:
        pytest.skip("no fused CPU attention kernel in this torch")
    calls: list[list[tuple[int, int]]] = []
    run_masked = engine._masked

    def counted(group: Any, *args: Any) -> None:
        calls.append([(piece.hi - piece.lo, piece.first - piece.start) for piece in group])
        run_masked(group, *args)

    monkeypatch.setattr(engine, "_masked", counted)
    monkeypatch.setattr(engine, "group_queries", group_queries)
    assert scores_of(reranker, query, documents) == pytest.approx(reference, abs=TOLERANCE)
    # Calls fused in one pass: adjacent pieces with different contexts never share one.
    other = "Which drink does the user like?"
    fused = reranker.rerank_many([(query, documents[3:], None), (other, documents[3:], None)])
    assert by_index(fused[0]) == pytest.approx(reference[3:], abs=TOLERANCE)
    assert by_index(fused[1]) == pytest.approx(qwen_recipe(other, documents[3:]), abs=TOLERANCE)
    long_calls = [call for call in calls if call[0][0] >= _qwen_engine._WHOLE_QUERIES]
    assert long_calls and all(len(call) == 1 for call in long_calls)
    if budget == 150:  # rows spanning chunks: their earlier keys are joined too
        assert any(before > 0 for call in long_calls for _, before in call)
    short_calls = [call for call in calls if call[0][0] < _qwen_engine._WHOLE_QUERIES]
    if group_queries:
        assert any(len(call) > 1 for call in short_calls)  # short pieces together
        assert all(
            sum(n for n, _ in call) <= group_queries for call in short_calls if len(call) > 1
        )
    else:
        assert not short_calls
    calls.clear()
    monkeypatch.setattr(_qwen_engine, "_WHOLE_QUERIES", 10**9)
    monkeypatch.setattr(engine, "group_queries", 0)
    assert scores_of(reranker, query, documents) == pytest.approx(reference, abs=TOLERANCE)
    assert not calls


@pytest.mark.parametrize(
    ("dtype", "amx", "grouped"),
    [("bfloat16", True, True), ("bfloat16", False, False), ("float32", True, False)],
)
def test_short_pieces_are_grouped_and_qkv_stacked_for_bf16_on_an_amx_cpu_only(
    tiny_qwen_dir: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, amx: bool, grouped: bool
) -> None:
    from memos_rerank_integrations._engine import qwen3 as _qwen_engine
    from memos_rerank_integrations._local.runtime import clear_model_cache

    monkeypatch.setattr(_qwen_engine, "cpu_has_amx", lambda: amx)
    clear_model_cache()
    try:
        engine = QwenReranker(tiny_qwen_dir, dtype=dtype)._loaded().engine
    finally:
        clear_model_cache()
    assert engine is not None
    assert engine.group_queries == (_qwen_engine._GROUP_QUERIES if grouped else 0)
    assert engine.stack_qkv == (grouped and engine.prepacked)  # q/k/v stacked: likewise
    assert engine.upcast_queries == (0 if amx else _qwen_engine._UPCAST_QUERIES)


def test_on_cpu_the_engine_is_read_from_the_files_and_holds_only_prepacked_weights(
    fp32: QwenReranker,
) -> None:
    """On CPU a checkpoint the packed engine covers is read from its files straight
    into the engine: no transformers model is built (the scorer has no decoder) and
    every projection is held once, as oneDNN's prepacked linear."""
    from memos_rerank_integrations._engine.linear import can_prepack

    if not can_prepack(torch.ones(1)):
        pytest.skip("this torch has no oneDNN prepacked linear")
    scorer = fp32._loaded()
    assert scorer.decoder is None
    engine = scorer.engine
    assert engine is not None and engine.prepacked
    for layer in engine.layers:
        projections = [layer.qkv] if layer.qkv is not None else [layer.q, layer.k, layer.v]
        for linear in [*projections, layer.out, layer.gate, layer.up, layer.down]:
            assert linear is not None and linear.packed and linear.weight.is_mkldnn
        assert layer.input_norm is None and layer.post_norm is None  # folded in


def test_through_transformers_the_projections_run_prepacked_and_the_model_is_held_once(
    tiny_qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded through transformers (a checkpoint not read from its files), every
    projection runs as oneDNN's prepacked linear on CPU too, and the decoder's plain
    copy of those weights is released (the model is not held twice); the decoder's
    own forward then refuses to run instead of computing with no weights."""
    from memos_rerank_integrations._engine.linear import can_prepack
    from memos_rerank_integrations._local import qwen as _qwen_module
    from memos_rerank_integrations._local.runtime import clear_model_cache

    if not can_prepack(torch.ones(1)):
        pytest.skip("this torch has no oneDNN prepacked linear")
    monkeypatch.setattr(_qwen_module, "open_qwen3", lambda model: None)
    clear_model_cache()
    try:
        scorer = QwenReranker(tiny_qwen_dir, dtype="float32")._loaded()
    finally:
        clear_model_cache()
    engine = scorer.engine
    assert engine is not None and scorer.decoder is not None
    assert engine.prepacked
    for decoder_layer, packed in zip(scorer.decoder.layers, engine.layers, strict=True):
        attention, mlp = decoder_layer.self_attn, decoder_layer.mlp
        for module in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            assert module.weight.numel() == 0
        for module in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            assert module.weight.numel() == 0
        assert packed.gate.packed and packed.gate.weight.is_mkldnn
    with pytest.raises(RuntimeError, match="prepacked"):
        scorer.decoder(input_ids=torch.tensor([[1, 2, 3]]))


def test_unpacked_projections_score_like_the_recipe(
    tiny_qwen_dir: Path, qwen_recipe: ModelCardRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The projections other devices get (``F.linear``/``addmm_`` on the model's own
    weights, kept in place) are exact too."""
    from memos_rerank_integrations._engine import qwen3 as _qwen_engine
    from memos_rerank_integrations._local.runtime import clear_model_cache

    monkeypatch.setattr(_qwen_engine, "can_prepack", lambda weight: False)
    clear_model_cache()
    try:
        reranker = QwenReranker(tiny_qwen_dir, dtype="float32", max_batch_tokens=64)
        scorer = reranker._loaded()
        assert scorer.engine is not None and not scorer.engine.prepacked
        assert scorer.decoder.layers[0].mlp.down_proj.weight.numel() > 0
        query = "Where is the user going?"
        documents = [LONG_DOCUMENT[:400], "User likes tea.", "x"]
        assert scores_of(reranker, query, documents) == pytest.approx(
            qwen_recipe(query, documents), abs=TOLERANCE
        )
    finally:
        clear_model_cache()


@pytest.fixture(scope="module", params=[False, True], ids=["no-bias", "qkv-bias"])
def shaped_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with its RMSNorm weights spread around 1 (a fresh model's are all
    ones, which no misplaced or missing norm weight would change), with or without
    q/k/v biases (random)."""
    from transformers import AutoModelForCausalLM

    path = _qwen_fixtures.build_tiny_qwen_reranker(
        tmp_path_factory.mktemp("tiny-qwen-shaped"), attention_bias=request.param
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.5 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith("bias"):
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("way", ["prepacked-stacked-qkv", "prepacked-separate-qkv", "plain"])
def test_prepared_weights_score_like_the_recipe(
    shaped_dir: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """Prepacked, the engine runs prepared copies of the weights: q and k in rotary
    pairs (rows reordered, their norm weights alike), the norms before attention and
    the MLP folded into the projections after them, q/k/v stacked on an AMX CPU;
    plain, the model's own weights. Every way, with norm weights that are not all
    ones and with q/k/v biases: float32 equals the recipe, bf16 drifts no more than
    the recipe's own bf16 run does."""
    from memos_rerank_integrations._engine import qwen3 as _qwen_engine
    from memos_rerank_integrations._engine.linear import can_prepack
    from memos_rerank_integrations._local.runtime import clear_model_cache

    prepack = way != "plain"
    if prepack and not can_prepack(torch.ones(1)):
        pytest.skip("this torch has no oneDNN prepacked linear")
    if not prepack:
        monkeypatch.setattr(_qwen_engine, "can_prepack", lambda weight: False)
    monkeypatch.setattr(_qwen_engine, "_amx_bf16", lambda dtype: way == "prepacked-stacked-qkv")
    query = "Where is the user going?"
    documents = [LONG_DOCUMENT[:400], "User likes tea.", "x", "User is going to Beijing."]
    reference = ModelCardRecipe(shaped_dir)(query, documents)
    recipe_bf16 = ModelCardRecipe(shaped_dir, dtype=torch.bfloat16)(query, documents)
    assert max(reference) - min(reference) > 0.02  # the scores tell documents apart
    clear_model_cache()
    try:
        fp32 = QwenReranker(shaped_dir, dtype="float32", max_batch_tokens=64)
        engine = fp32._loaded().engine
        assert engine is not None and engine.prepacked == prepack and engine.pairs == prepack
        stacked = way == "prepacked-stacked-qkv"
        assert engine.stack_qkv == stacked
        assert all((layer.qkv is not None) == stacked for layer in engine.layers)
        assert all((layer.q is None) == stacked for layer in engine.layers)
        assert scores_of(fp32, query, documents) == pytest.approx(reference, abs=TOLERANCE)
        bf16 = scores_of(QwenReranker(shaped_dir, dtype="bfloat16"), query, documents)
    finally:
        clear_model_cache()
    drift = max(abs(a - b) for a, b in zip(bf16, reference, strict=True))
    recipe_drift = max(abs(a - b) for a, b in zip(recipe_bf16, reference, strict=True))
    assert drift <= max(recipe_drift, 0.005) * 2


def test_a_rotary_embedding_not_in_halves_keeps_the_model_order(fp32: QwenReranker) -> None:
    """The pair order assumes each pair (i, i + dim / 2) turns by one angle, as every
    RoPE variant transformers implements does; a rotary embedding that does not
    (probed at load) leaves q and k in the model's order."""
    from memos_rerank_integrations._engine.qwen3 import PackedQwen3

    loaded = fp32._loaded().engine
    assert loaded is not None
    engine = PackedQwen3.__new__(PackedQwen3)
    engine.head_dim = loaded.head_dim
    engine.rotary = loaded.rotary
    assert engine._rotary_in_halves(device=torch.device("cpu"))

    def skewed(x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = loaded.rotary(x, positions)
        half = cos.shape[-1] // 2
        return cos, torch.cat([sin[..., :half], -sin[..., half:]], -1)

    engine.rotary = skewed
    assert not engine._rotary_in_halves(device=torch.device("cpu"))


def test_weights_onednn_refuses_to_prepack_leave_the_engine_plain_and_exact(
    tiny_qwen_dir: Path, qwen_recipe: ModelCardRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where oneDNN refuses a weight at load (its reorder raises), no projection is
    prepacked and none is released: the engine runs them all on the model's weights."""
    from memos_rerank_integrations._engine import linear as _linear
    from memos_rerank_integrations._engine import qwen3 as _qwen_engine
    from memos_rerank_integrations._local.runtime import clear_model_cache

    calls: list[int] = []

    def refuse(weight: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 3:  # a few weights pack, then one is refused
            raise RuntimeError("oneDNN: unsupported")
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)

    monkeypatch.setattr(_linear, "_reorder", refuse)
    monkeypatch.setattr(_qwen_engine, "can_prepack", lambda weight: True)
    clear_model_cache()
    try:
        reranker = QwenReranker(tiny_qwen_dir, dtype="float32")
        scorer = reranker._loaded()
        assert scorer.engine is not None and not scorer.engine.prepacked
        assert len(calls) > 3
        assert all(not layer.q.packed for layer in scorer.engine.layers)
        assert scorer.decoder.layers[0].self_attn.q_proj.weight.numel() > 0
        query, documents = "Where is the user going?", ["User likes tea.", "x"]
        assert scores_of(reranker, query, documents) == pytest.approx(
            qwen_recipe(query, documents), abs=TOLERANCE
        )
    finally:
        clear_model_cache()


def test_a_long_document_costs_memory_bounded_by_the_budget(tiny_qwen_dir: Path) -> None:
    """A ~16k-token document with max_batch_tokens=256 holds one layer's keys and
    values and the residual stream (640 bytes per token for this model) plus one
    chunk's activations: far below what attending over it all at once takes (its
    16k x 16k mask alone is 256 MiB). Measured as the peak RSS of a child process."""
    import json
    import subprocess
    import sys

    child = Path(__file__).parents[1] / "support" / "qwen_memory_child.py"
    done = subprocess.run(
        [sys.executable, str(child), str(tiny_qwen_dir), "256", "1600"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tokens"] > 15000
    assert 0.0 <= report["score"] <= 1.0
    assert report["peak_extra_mib"] < 48, report


def test_a_model_the_engine_does_not_cover_keeps_transformers_forward(
    tmp_path: Path,
) -> None:
    """An architecture the packed engine does not implement (here a GELU MLP) is run by
    transformers' own forward, as exact as ever, budget and prefixes included."""
    from memos_rerank_integrations.testing import build_tiny_qwen_reranker

    path = build_tiny_qwen_reranker(tmp_path / "gelu", hidden_act="gelu")
    recipe = ModelCardRecipe(path)
    reranker = QwenReranker(path, dtype="float32", max_batch_tokens=120)
    assert reranker._loaded().engine is None
    query = "Where is the user going?"
    documents = [LONG_DOCUMENT[:500], "User likes tea.", "x", "User likes tea."]
    assert scores_of(reranker, query, documents) == pytest.approx(
        recipe(query, documents), abs=TOLERANCE
    )
    together = reranker.rerank_many([(query, documents, None), ("q", ["a memory"], None)])
    assert by_index(together[1]) == pytest.approx(recipe("q", ["a memory"]), abs=TOLERANCE)


# Variants of the tiny model that the packed engine refuses (see packed_engine): a GELU
# MLP, and sliding-window attention in the second layer (shorter than the prompts).
UNCOVERED = {
    "gelu": {"hidden_act": "gelu"},
    "sliding-window": {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1},
}


@pytest.fixture(scope="module", params=sorted(UNCOVERED))
def uncovered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from memos_rerank_integrations.testing import build_tiny_qwen_reranker

    directory = tmp_path_factory.mktemp(request.param)
    return build_tiny_qwen_reranker(directory, seed=7, **UNCOVERED[request.param])


def test_rerank_many_on_a_model_the_engine_does_not_cover_equals_the_recipe(
    uncovered: Path,
) -> None:
    """Every call of a rerank_many is the recipe's ranking: calls of several documents
    (their queries run once and kept), a lone document, an empty call, duplicates and
    top_n, mixed in passes of a small budget, so rows resting on different cached
    prefixes share padded, masked batches."""
    recipe = ModelCardRecipe(uncovered)
    reranker = QwenReranker(uncovered, dtype="float32", max_batch_tokens=160)
    scorer = reranker._loaded()
    assert scorer.engine is None
    assert scorer.reuses_prefixes == ("sliding" not in uncovered.name)
    documents = [LONG_DOCUMENT[:400], "User likes tea.", "x", "User likes tea.", LONG_DOCUMENT[:90]]
    calls: list[tuple[str, list[str], int | None]] = [
        ("Where is the user going next week?", documents, None),
        ("q", ["a memory"], None),
        ("drinks?", [], 3),
        ("What does the user drink?", documents[::-1], 2),
        ("Where is the user?", documents[1:3], 1),
    ]
    together = reranker.rerank_many(calls)
    for (query, docs, top_n), got in zip(calls, together, strict=True):
        expected = recipe(query, docs) if docs else []
        order = sorted(range(len(docs)), key=lambda i: (-expected[i], i))[:top_n]
        assert [r.index for r in got] == order
        assert [r.score for r in got] == pytest.approx([expected[i] for i in order], abs=TOLERANCE)
        assert [(r.index, r.stage) for r in got] == [
            (r.index, r.stage) for r in reranker.rerank(query, docs, top_n)
        ]
    assert together[2] == []
    # The duplicate documents tie exactly, in input order.
    first, second = (r for r in together[0] if r.index in (1, 3))
    assert (first.index, first.score) == (1, second.score)


# -- the model, its dtype and its padding -----------------------------------------------------


def test_model_is_loaded_once_per_model_device_and_dtype(tiny_qwen_dir: Path) -> None:
    first = QwenReranker(tiny_qwen_dir, dtype="float32", instruction="one")
    second = QwenReranker(str(tiny_qwen_dir), dtype=torch.float32, instruction="two")
    other_dtype = QwenReranker(tiny_qwen_dir, dtype="bfloat16")
    assert first._loaded() is second._loaded()
    assert other_dtype._loaded() is not first._loaded()


def test_default_dtype_follows_the_hardware(tiny_qwen_dir: Path) -> None:
    reranker = QwenReranker(tiny_qwen_dir, device="cpu")
    expected = resolve_dtype(None, torch.device("cpu"))
    assert reranker._loaded().dtype == expected
    assert reranker._loaded().device == torch.device("cpu")


@pytest.mark.parametrize("upcast_queries", [None, 0, 1 << 20], ids=["cpu-default", "bf16", "fp32"])
def test_bfloat16_drift_against_fp32_recipe(
    tiny_qwen_dir: Path,
    qwen_recipe: ModelCardRecipe,
    record_property: Callable[[str, object], None],
    upcast_queries: int | None,
) -> None:
    # Both ways of running bf16 attention (the fused kernel in bf16, or in float32 for
    # few queries: chosen by the CPU) are checked on every machine.
    query = EXAMPLES[1]["query"]
    documents = EXAMPLES[1]["documents"] + EXAMPLES[0]["documents"] + ["", "Plays chess."]
    reference = qwen_recipe(query, documents)
    reranker = QwenReranker(tiny_qwen_dir, dtype="bfloat16")
    engine = reranker._loaded().engine
    assert engine is not None
    default = engine.upcast_queries
    if upcast_queries is not None:
        engine.upcast_queries = upcast_queries
    try:
        bf16 = scores_of(reranker, query, documents)
    finally:
        engine.upcast_queries = default
    recipe_bf16 = ModelCardRecipe(tiny_qwen_dir, dtype=torch.bfloat16)(query, documents)
    drift = max(abs(a - b) for a, b in zip(bf16, reference, strict=True))
    recipe_drift = max(abs(a - b) for a, b in zip(recipe_bf16, reference, strict=True))

    def top5(scores: list[float]) -> list[int]:
        return sorted(range(len(scores)), key=lambda i: -scores[i])[:5]

    record_property("bf16_max_abs_diff", drift)
    record_property("recipe_bf16_max_abs_diff", recipe_drift)
    record_property("bf16_top5_order_changed", top5(bf16) != top5(reference))
    # bf16 keeps ~3 significant digits; the package's final projection runs in float32,
    # so it drifts no more than the recipe itself does in bf16.
    assert drift < 0.02
    assert drift <= max(recipe_drift, 0.005) * 2
    # Only documents closer than the drift may swap places.
    for i, j in itertools.combinations(range(len(documents)), 2):
        if (reference[i] - reference[j]) * (bf16[i] - bf16[j]) < 0:
            assert abs(reference[i] - reference[j]) <= 2 * drift


def test_tokenizer_without_padding_token(
    tiny_qwen_nopad_dir: Path, qwen_recipe: ModelCardRecipe
) -> None:
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_qwen_nopad_dir).pad_token is None
    reranker = QwenReranker(tiny_qwen_nopad_dir, dtype="float32")
    documents = ["short", "a much longer memory about playing badminton on weekends", ""]
    # Same weights and vocabulary as the padded build: same scores as the recipe.
    assert scores_of(reranker, "hobbies?", documents) == pytest.approx(
        qwen_recipe("hobbies?", documents), abs=TOLERANCE
    )


def test_missing_model_raises_model_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    reranker = QwenReranker(missing)
    with pytest.raises(ModelLoadError) as caught:
        reranker.rerank("q", ["d"])
    message = str(caught.value)
    assert str(missing) in message
    assert "local directory" in message


def test_hub_id_offline_raises_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reranker = QwenReranker("memos-test/not-a-real-reranker", device="cpu")
    with pytest.raises(ModelLoadError, match="memos-test/not-a-real-reranker"):
        reranker.rerank("q", ["d"])


def test_a_sequence_classification_checkpoint_is_refused_naming_cross_encoder(
    tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    """A Qwen3 "-seq-cls" checkpoint loads as a causal LM without a missing weight (its
    LM head is tied to the embeddings), but its yes/no logits mean nothing."""
    from transformers import AutoConfig, AutoTokenizer, Qwen3ForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_qwen_dir)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        Qwen3ForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_qwen_dir).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        QwenReranker(tmp_path, dtype="float32").rerank("q", ["d"])
    message = str(caught.value)
    assert "Qwen3ForSequenceClassification" in message and "CrossEncoderReranker" in message


def test_a_checkpoint_missing_weights_is_refused(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    path = without_weights(tiny_qwen_dir, tmp_path / "no-mlp", "model.layers.1.mlp.")
    with pytest.raises(ModelLoadError) as caught:
        QwenReranker(path, dtype="float32").rerank("q", ["d"])
    message = str(caught.value)
    assert "no weights for model.layers.1.mlp.down_proj.weight" in message
    assert "at random" in message


def test_no_documents_needs_no_model(tmp_path: Path) -> None:
    assert QwenReranker(tmp_path / "never-loaded").rerank("q", []) == []


# -- results, options and errors -----------------------------------------------------------


def test_results_sorted_with_plain_float_scores_and_stages(fp32: QwenReranker) -> None:
    example = EXAMPLES[1]
    results = fp32.rerank(example["query"], example["documents"])
    assert sorted(r.index for r in results) == list(range(len(example["documents"])))
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    for result in results:
        assert isinstance(result, RerankResult)
        assert type(result.score) is float
        assert 0.0 <= result.score <= 1.0
        assert result.stage is fp32.thresholds.stage(result.score)
    assert fp32.rerank(example["query"], example["documents"], top_n=2) == results[:2]


def test_custom_thresholds_set_the_stages(tiny_qwen_dir: Path) -> None:
    thresholds = StageThresholds(0.01, 0.02, 0.03, 0.04)
    results = QwenReranker(tiny_qwen_dir, dtype="float32", thresholds=thresholds).rerank(
        "q", ["some memory"]
    )
    assert results[0].stage is Stage.HIGHLY_RELEVANT


def test_query_truncation(tiny_qwen_dir: Path, qwen_recipe: ModelCardRecipe) -> None:
    reranker = QwenReranker(tiny_qwen_dir, dtype="float32", max_query_length=4)
    long_query = "What are the user's hobbies and favourite drinks and travel plans?"
    ids = qwen_recipe.tokenizer.encode(long_query, add_special_tokens=False)
    short_query = qwen_recipe.tokenizer.decode(ids[:4])
    documents = ["User likes playing badminton.", "User prefers baijiu."]
    assert scores_of(reranker, long_query, documents) == pytest.approx(
        qwen_recipe(short_query, documents), abs=TOLERANCE
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": True}, "max_length"),
        ({"max_batch_tokens": -5}, "max_batch_tokens"),
        ({"max_query_length": 0}, "max_query_length"),
        ({"instruction": 3}, "instruction"),
        ({"instruction": "x" * (MAX_INSTRUCTION_LENGTH + 1)}, "at most 8192 are accepted"),
        ({"instruction": "half \ud800 a pair"}, "instruction contains a lone surrogate"),
        ({"thresholds": (0.1, 0.2, 0.3, 0.4)}, "thresholds"),
    ],
)
def test_invalid_options(tiny_qwen_dir: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        QwenReranker(tiny_qwen_dir, **kwargs)


def test_an_instruction_of_the_longest_length_is_accepted(tiny_qwen_dir: Path) -> None:
    instruction = "x" * MAX_INSTRUCTION_LENGTH
    assert QwenReranker(tiny_qwen_dir, instruction=instruction).instruction == instruction


def test_an_instruction_that_fills_max_length_is_refused_before_the_weights_load(
    tiny_qwen_dir: Path,
) -> None:
    """Cut to fit, every document would keep no token of its own and all would score
    the same; the check needs only the tokenizer."""
    local_runtime.clear_model_cache()
    reranker = QwenReranker(
        tiny_qwen_dir, instruction="Find the memories. " * 20, max_length=80, dtype="float32"
    )
    with pytest.raises(InvalidInputError, match="leaving no room for the query and document"):
        reranker.rerank("q", ["User likes tea.", "User likes playing badminton."])
    with pytest.raises(InvalidInputError, match="max_length=80"):
        reranker.count_tokens("q", ["d"])
    assert not any(key[0] == "qwen-yes-no" for key in local_runtime._cache), "the weights loaded"
    local_runtime.clear_model_cache()


def test_max_length_too_small_for_the_prompt(tiny_qwen_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="max_length=10"):
        QwenReranker(tiny_qwen_dir, dtype="float32", max_length=10).rerank("q", ["d"])


def test_invalid_device(tiny_qwen_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="device"):
        QwenReranker(tiny_qwen_dir, device="toaster").rerank("q", ["d"])


@pytest.mark.parametrize(
    ("query", "documents", "top_n"),
    [(None, ["d"], None), ("q", "d", None), ("q", ["d", 3], None), ("q", ["d"], 0)],
)
def test_invalid_inputs(fp32: QwenReranker, query: Any, documents: Any, top_n: Any) -> None:
    with pytest.raises(InvalidInputError):
        fp32.rerank(query, documents, top_n)
    with pytest.raises(InvalidInputError):
        fp32.rerank_many([(query, documents, top_n)])


def test_rerank_many_rejects_malformed_calls(fp32: QwenReranker) -> None:
    with pytest.raises(InvalidInputError, match="calls\\[1\\]"):
        fp32.rerank_many([("q", ["d"], None), ("q", ["d"])])  # type: ignore[list-item]


def test_repr_names_the_model(tiny_qwen_dir: Path) -> None:
    assert str(tiny_qwen_dir) in repr(QwenReranker(tiny_qwen_dir))
    assert PROMPT_PREFIX not in repr(QwenReranker(tiny_qwen_dir))


# -- concurrency -------------------------------------------------------------------------------


async def test_arerank_equals_rerank_and_concurrent_calls_are_safe(fp32: QwenReranker) -> None:
    queries = [example["query"] for example in EXAMPLES] + ["Where does the user work?"]
    documents = EXAMPLES[1]["documents"]
    expected = [fp32.rerank(query, documents) for query in queries]
    got = await asyncio.gather(*(fp32.arerank(query, documents) for query in queries * 3))
    for i, results in enumerate(got):
        reference = expected[i % len(queries)]
        assert [r.index for r in results] == [r.index for r in reference]
        assert [r.score for r in results] == pytest.approx([r.score for r in reference], abs=1e-6)


def test_threads_share_one_model_safely(tiny_qwen_dir: Path) -> None:
    rerankers = [
        QwenReranker(tiny_qwen_dir, dtype="float32", instruction=f"instruction {i % 3}")
        for i in range(6)
    ]
    documents = EXAMPLES[1]["documents"]
    expected = [scores_of(r, f"query {i}", documents) for i, r in enumerate(rerankers)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda i: scores_of(rerankers[i], f"query {i}", documents), range(6)))
    for a, b in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


# -- batching helpers --------------------------------------------------------------------------


def test_limit_padding_splits_only_wasteful_batches() -> None:
    lengths = [30, 29, 28, 20, 19, 10, 9, 1]
    batch = list(range(len(lengths)))  # already longest first
    runs = limit_padding(batch, lengths, max_padding=0.2)
    assert [i for run in runs for i in run] == batch
    for run in runs:
        padded = len(run) * max(lengths[i] for i in run)
        assert padded - sum(lengths[i] for i in run) <= 0.2 * padded or len(run) == 1
    assert len(runs) > 1
    # Small batches are kept whole: a bigger matmul is worth more than its padding.
    assert limit_padding(batch, lengths, max_padding=0.2, min_tokens=1000) == [batch]


async def test_arerank_does_not_block_the_event_loop(fp32: QwenReranker) -> None:
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    documents = ["The quick brown fox jumps over the lazy dog. " * 40] * 8
    task = asyncio.create_task(ticker())
    results = await fp32.arerank(
        "Which animal jumps?", [f"{i} {d}" for i, d in enumerate(documents)]
    )
    done.set()
    await task
    assert len(results) == len(documents)
    assert ticks > 1  # the loop kept running while the model did


def test_rows_with_different_cached_prefixes_share_a_pass(
    fp32: QwenReranker, qwen_recipe: ModelCardRecipe
) -> None:
    """Rows resting on cached prefixes of different lengths (rerank_many mixes calls)
    give in one padded, masked pass exactly what each gives alone."""
    scorer = fp32._loaded()
    base = scorer._instruction_prefix(scorer.tokens.instruction_ids(fp32.instruction))
    documents = ["User likes playing badminton.", "I don't drink alcohol."]
    sequences = _sequences(
        scorer, fp32.instruction, "hobbies?", documents, max_length=8192, max_query_length=None
    )
    cuts = [10, len(base.ids) - 3, len(base.ids)]
    rows = [
        _Row(base.crop(cut), sequence[cut:])
        for cut, sequence in zip(cuts, [sequences[0], sequences[1], sequences[0]], strict=True)
    ]
    with torch.inference_mode():
        scores = scorer._run(rows, 10**6, keep_kv=False)
        alone = [scorer._run([row], 10**6, keep_kv=False)[0] for row in rows]
        extended = scorer._run(rows, 10**6, keep_kv=True)
        extended_alone = [scorer._run([row], 10**6, keep_kv=True)[0] for row in rows]
    expected = qwen_recipe("hobbies?", documents)
    assert scores == pytest.approx([expected[0], expected[1], expected[0]], abs=TOLERANCE)
    assert scores == pytest.approx(alone, abs=1e-5)
    for together, single in zip(extended, extended_alone, strict=True):
        assert isinstance(together, _Prefix) and isinstance(single, _Prefix)
        assert together.ids == single.ids
        assert together.kv is not None and single.kv is not None
        for (k1, v1), (k2, v2) in zip(together.kv, single.kv, strict=True):
            torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4)


# -- tokenization bounded by the input, exact at every boundary ---------------------------------

ADVERSARIAL_QUERIES = [
    "q",
    "",
    "ends with spaces   ",
    "ends with a newline\n",
    "ends with newlines\n\n\n",
    "ends with punctuation?!",
    "ends with a colon:",
    "ends in digits 2024",
    "用户喜欢什么酒",
    "combining e\u0301",
    "<|im_end|>",
    " ",
]
ADVERSARIAL_DOCUMENTS = [
    "",
    " ",
    "   three leading spaces",
    "\nstarts with a newline",
    "\n\n\nnewlines",
    "\u0301 starts with a combining mark",
    "\u0301",
    "\u0338<",
    "e\u0301\u0323",
    "123 digits first",
    "9",
    "茅台 CJK first",
    "'s contraction first",
    ": colon first",
    "<|im_end|> a special token first",
    "<think>",
    "\t tab",
    "\u00a0no-break space",
    "\u1161 hangul vowel",
    "🙂",
]


@pytest.mark.parametrize("query", ADVERSARIAL_QUERIES)
def test_token_ids_equal_the_recipe_at_adversarial_boundaries(
    fp32: QwenReranker, qwen_recipe: ModelCardRecipe, query: str
) -> None:
    scorer = fp32._loaded()
    got = _sequences(
        scorer,
        fp32.instruction,
        query,
        ADVERSARIAL_DOCUMENTS,
        max_length=8192,
        max_query_length=None,
    )
    assert got == qwen_recipe.sequences(query, ADVERSARIAL_DOCUMENTS)


@pytest.mark.parametrize("query", ["ends with spaces   ", "ends with a newline\n", "用户", ""])
def test_scores_equal_the_recipe_at_adversarial_boundaries(
    fp32: QwenReranker, qwen_recipe: ModelCardRecipe, query: str
) -> None:
    assert scores_of(fp32, query, ADVERSARIAL_DOCUMENTS) == pytest.approx(
        qwen_recipe(query, ADVERSARIAL_DOCUMENTS), abs=TOLERANCE
    )


long_text = st.lists(
    st.sampled_from(
        [*"ab Y1:?'\n\t茅🙂", "e\u0301", "\u0301", "\u0323", "<|im_end|>", "  ", "\u1161"]
    ),
    max_size=120,
).map(lambda pieces: "".join(pieces) * 3)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(query=long_text, documents=st.lists(long_text, min_size=1, max_size=4))
def test_bounded_tokenization_equals_the_recipe_when_documents_are_cut(
    fp32: QwenReranker,
    tiny_qwen_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    query: str,
    documents: list[str],
) -> None:
    """With a small max_length and short prefixes (so cuts fall anywhere in the query
    and documents), the ids still equal the recipe's: the cut never changes a kept
    token. (The default instruction's part of the prompt takes 66 tokens here; a
    max_length that cuts into it is refused.)"""
    from memos_rerank_integrations._local import tokenize as _local_engine

    monkeypatch.setattr(_local_engine, "_HEAD_MIN_CHARS", 4)
    monkeypatch.setattr(_local_engine, "_CUT_SEARCH", 8)
    scorer = fp32._loaded()
    for max_length in (67, 90):
        recipe = _recipe_for(tiny_qwen_dir, max_length)
        got = _sequences(
            scorer, fp32.instruction, query, documents, max_length=max_length, max_query_length=None
        )
        assert got == recipe.sequences(query, documents)


_recipes: dict[tuple[Path, int], ModelCardRecipe] = {}


def _recipe_for(path: Path, max_length: int) -> ModelCardRecipe:
    if (path, max_length) not in _recipes:
        _recipes[path, max_length] = ModelCardRecipe(path, max_length=max_length)
    return _recipes[path, max_length]


class _TextMeter:
    """Counts the characters the tokenizer is handed (the work tokenization does)."""

    def __init__(self, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chars = 0
        self.calls = 0
        original = type(tokenizer).__call__

        def counting(this: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
            texts = [text] if isinstance(text, str) else list(text)
            self.chars += sum(len(t) for t in texts)
            self.calls += 1
            return original(this, text, *args, **kwargs)

        monkeypatch.setattr(type(tokenizer), "__call__", counting)


def test_a_huge_query_is_tokenized_once_not_once_per_document(
    fp32: QwenReranker, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = fp32._loaded()
    query = "What are the user's hobbies and favourite drinks? " * 2000  # 100 kB
    documents = [chr(ord("a") + i % 26) for i in range(400)]
    meter = _TextMeter(scorer.tokens.tokenizer, monkeypatch)
    tokens = fp32.count_tokens(query, documents)
    assert meter.chars < 2 * len(query)  # not 400 x the query
    # Every prompt is max_length long: the query fills the body, the documents are cut away.
    assert tokens == 400 * fp32.max_length


def test_a_huge_document_is_tokenized_only_as_far_as_it_fits(
    tiny_qwen_dir: Path, qwen_recipe: ModelCardRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    reranker = QwenReranker(tiny_qwen_dir, dtype="float32", max_length=512)
    recipe = _recipe_for(tiny_qwen_dir, 512)
    document = "User is going on a business trip to Beijing next Wednesday. " * 20_000  # 1.2 MB
    expected = recipe.sequences("Where?", [document, "short"])
    meter = _TextMeter(reranker._loaded().tokens.tokenizer, monkeypatch)
    got = _sequences(
        reranker._loaded(),
        reranker.instruction,
        "Where?",
        [document, "short"],
        max_length=512,
        max_query_length=None,
    )
    assert got == expected
    assert meter.chars < 20_000  # a few thousand characters, not 1.2 million
    assert scores_of(reranker, "Where?", [document, "short"]) == pytest.approx(
        recipe("Where?", [document, "short"]), abs=TOLERANCE
    )


def test_query_cap_is_applied_once_and_bounded(
    tiny_qwen_dir: Path, qwen_recipe: ModelCardRecipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    reranker = QwenReranker(tiny_qwen_dir, dtype="float32", max_query_length=16)
    query = "Where is the user travelling next week, and when? " * 20_000  # 1 MB
    ids = qwen_recipe.tokenizer.encode(query[:2000], add_special_tokens=False)
    capped = qwen_recipe.tokenizer.decode(ids[:16])
    documents = ["User is going to Beijing.", "", " starts with a space"]
    meter = _TextMeter(reranker._loaded().tokens.tokenizer, monkeypatch)
    got = _sequences(
        reranker._loaded(),
        reranker.instruction,
        query,
        documents,
        max_length=8192,
        max_query_length=16,
    )
    assert meter.chars < 10_000
    assert got == qwen_recipe.sequences(capped, documents)
    assert scores_of(reranker, query, documents) == pytest.approx(
        qwen_recipe(capped, documents), abs=TOLERANCE
    )


@pytest.mark.parametrize("max_query_length", [None, 3])
@pytest.mark.parametrize("max_length", [80, 8192])
def test_count_tokens_is_the_recipes_prompt_length(
    tiny_qwen_dir: Path,
    qwen_recipe: ModelCardRecipe,
    max_length: int,
    max_query_length: int | None,
) -> None:
    reranker = QwenReranker(
        tiny_qwen_dir, dtype="float32", max_length=max_length, max_query_length=max_query_length
    )
    query = "What are the user's hobbies and favourite drinks?"
    if max_query_length is not None:
        ids = qwen_recipe.tokenizer.encode(query, add_special_tokens=False)
        recipe_query = qwen_recipe.tokenizer.decode(ids[:max_query_length])
    else:
        recipe_query = query
    documents = ["User likes badminton.", "", "a much longer memory " * 30, "User likes badminton."]
    expected = _recipe_for(tiny_qwen_dir, max_length).sequences(recipe_query, documents)
    assert reranker.count_tokens(query, documents) == sum(len(s) for s in expected)
    assert reranker.count_tokens(query, []) == 0
    with pytest.raises(InvalidInputError):
        reranker.count_tokens(query, "not a list")  # type: ignore[arg-type]


def test_count_tokens_needs_no_weights(tmp_path: Path) -> None:
    from memos_rerank_integrations.testing import build_tiny_qwen_reranker

    path = build_tiny_qwen_reranker(tmp_path / "model")
    (path / "model.safetensors").unlink()  # no weights at all: only the tokenizer can load
    reranker = QwenReranker(path, dtype="float32")
    assert reranker.count_tokens("q", ["a memory"]) > 0
    assert reranker._scorer is None
    with pytest.raises(ModelLoadError):
        reranker.rerank("q", ["a memory"])


def test_tokenizing_does_not_wait_for_a_running_forward_pass(fp32: QwenReranker) -> None:
    scorer = fp32._loaded()
    with scorer.lock, ThreadPoolExecutor(max_workers=1) as pool:  # as if a pass were running
        counted = pool.submit(fp32.count_tokens, "q", ["a memory", "another"])
        assert counted.result(timeout=30) > 0


def test_no_deprecation_warning_from_transformers(
    fp32: QwenReranker, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        fp32.rerank("fresh query about warnings", ["a memory", "another memory"])
        fp32.rerank_many([("q1", ["a", "b"], None), ("q2", ["c"], None)])
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "deprecated" in m], messages


# -- pinned: thread safety, fine-tunes, prefixes, the instruction cache --------------------------


def test_eight_threads_with_different_instructions_and_lengths_match_sequential_calls(
    tiny_qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 threads x 20 calls over one model: the same scores as the calls run one at a time."""
    rerankers = [
        QwenReranker(
            tiny_qwen_dir,
            dtype="float32",
            instruction=f"Instruction {i % 4}: find what the user said",
            max_length=(72, 90, 8192)[i % 3],
        )
        for i in range(8)
    ]
    memories = EXAMPLES[1]["documents"] + EXAMPLES[0]["documents"]

    def calls(worker: int) -> list[tuple[str, list[str]]]:
        return [
            (f"query {worker}-{j} about hobbies", memories[j % 3 : j % 3 + 2 + j % 4])
            for j in range(20)
        ]

    def run(worker: int) -> list[list[float]]:
        return [scores_of(rerankers[worker], q, docs) for q, docs in calls(worker)]

    sequential = [run(worker) for worker in range(8)]
    # Watch the model's forward passes: one at a time (they share its buffers and caches).
    scorer = rerankers[0]._loaded()
    assert scorer.engine is not None
    forward = scorer.engine.forward
    active, most = 0, 0
    watch = threading.Lock()

    def watched(*args: Any, **kwargs: Any) -> Any:
        nonlocal active, most
        with watch:
            active += 1
            most = max(most, active)
        try:
            time.sleep(0.001)  # widen the window a missing lock would leave open
            return forward(*args, **kwargs)
        finally:
            with watch:
                active -= 1

    monkeypatch.setattr(scorer.engine, "forward", watched)
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(run, range(8)))
    for got, expected in zip(concurrent, sequential, strict=True):
        for a, b in zip(got, expected, strict=True):
            assert a == pytest.approx(b, abs=1e-6)
    assert most == 1


def _build_biased_head_model(path: Path, source: Path) -> Path:
    """A fine-tune whose output head has a bias: a registered Qwen3 variant (the way
    transformers loads custom architectures), saved and loaded through from_pretrained."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    class BiasedHeadConfig(Qwen3Config):
        model_type = "qwen3-biased-head-test"

    class BiasedHeadQwen3(Qwen3ForCausalLM):
        config_class = BiasedHeadConfig

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
            self.post_init()

    try:
        AutoConfig.register(BiasedHeadConfig.model_type, BiasedHeadConfig)
        AutoModelForCausalLM.register(BiasedHeadConfig, BiasedHeadQwen3)
    except ValueError:  # already registered by an earlier call in this process
        pass
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = BiasedHeadConfig(**{**base.config.to_dict(), "tie_word_embeddings": False})
    model = BiasedHeadQwen3(config)
    model.load_state_dict(base.state_dict(), strict=False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    with torch.no_grad():
        model.lm_head.weight.copy_(base.lm_head.weight)
        model.lm_head.bias.normal_(0.0, 1.0)
        model.lm_head.bias[yes] = 1.5
        model.lm_head.bias[no] = -0.75
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_fine_tune_with_a_biased_head_scores_like_the_recipe(
    tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    path = _build_biased_head_model(tmp_path / "biased", tiny_qwen_dir)
    recipe = ModelCardRecipe(path)
    reranker = QwenReranker(path, dtype="float32")
    assert reranker._loaded().bias == pytest.approx(2.25)
    query, documents = EXAMPLES[1]["query"], EXAMPLES[1]["documents"]
    expected = recipe(query, documents)
    assert scores_of(reranker, query, documents) == pytest.approx(expected, abs=TOLERANCE)
    # The bias really moves the scores (else this test proves nothing about it).
    assert (
        max(
            abs(a - b)
            for a, b in zip(expected, ModelCardRecipe(tiny_qwen_dir)(query, documents), strict=True)
        )
        > 0.05
    )


@pytest.mark.parametrize(
    "documents",
    [
        # one document's tokens a strict prefix of another's
        ["User likes tea", "User likes tea and long walks on the beach.", "User"],
        # a whole recipe sequence a strict prefix of another's: the document goes on
        # with the prompt's own suffix
        ["User likes tea.", "User likes tea." + PROMPT_SUFFIX + "And more.", "x"],
        ["User likes tea.", "User likes tea." + PROMPT_SUFFIX],
    ],
)
def test_documents_whose_tokens_prefix_each_other_score_like_the_recipe(
    fp32: QwenReranker, qwen_recipe: ModelCardRecipe, documents: list[str]
) -> None:
    query = "What does the user drink?"
    sequences = qwen_recipe.sequences(query, documents)
    first, second = sequences[0], sequences[1]
    shorter = first[: -len(qwen_recipe.suffix_tokens)]
    assert second[: len(shorter)] == shorter  # the premise holds
    got = scores_of(fp32, query, documents)
    assert got == pytest.approx(qwen_recipe(query, documents), abs=TOLERANCE)
    many = fp32.rerank_many([(query, documents, None), ("another query", documents[:1], None)])
    assert by_index(many[0]) == pytest.approx(got, abs=1e-6)


def test_the_instruction_cache_holds_each_instruction(
    tiny_qwen_dir: Path, qwen_recipe: ModelCardRecipe
) -> None:
    first = QwenReranker(tiny_qwen_dir, dtype="float32", instruction="Find the user's hobbies")
    second = QwenReranker(tiny_qwen_dir, dtype="float32", instruction="Find the user's drinks")
    counting = TokenCounter(first)
    try:
        first.rerank("warm", ["x"])
        second.rerank("warm", ["x"])
        for reranker in (second, first):  # the second, then the first again
            counting.clear()
            query, documents = "Which memories matter?", ["User likes tea.", "User plays chess."]
            scores = scores_of(reranker, query, documents)
            assert scores == pytest.approx(
                qwen_recipe(query, documents, reranker.instruction), abs=TOLERANCE
            )
            scorer = reranker._loaded()
            cached = len(scorer.tokens.instruction_ids(reranker.instruction))
            sequences = qwen_recipe.sequences(query, documents, reranker.instruction)
            # Only the query, the documents and the suffix ran, in one pass: the query
            # (right after this instruction's cached prefix), then the documents.
            assert len(counting.passes) == 1
            query_row, *document_rows = counting.passes[0]
            assert not query_row.score and query_row.prefix_length == cached
            assert list(query_row.ids) == sequences[0][cached : cached + len(query_row.ids)]
            shared = cached + len(query_row.ids)
            assert [list(row.ids) for row in document_rows] == [
                sequence[shared:] for sequence in sequences
            ]
            assert all(row.parent == 0 for row in document_rows)
    finally:
        counting.close()
