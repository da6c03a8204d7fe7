"""compare / acompare, the A/B helper, and ``memos-rerank compare``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import memos_rerank_integrations
from memos_rerank_integrations import (
    BackendUnavailableError,
    Comparison,
    InvalidInputError,
    RerankResult,
    Stage,
    acompare,
    compare,
)
from memos_rerank_integrations._compare import VECTOR_ORDER
from memos_rerank_integrations.cli import main as cli_main

from .support.backends import SUBPROCESS_ENV, OverlapReranker, RawReranker, ScriptedReranker

QUERY = "playing badminton hobbies"
DOCS = [
    "User is a backend developer in Hangzhou.",
    "User likes playing badminton.",
    "User prefers concise replies.",
]


def test_vector_order_first_then_each_reranker() -> None:
    scripted = ScriptedReranker([0.2, 0.1, 0.9])
    comparison = compare(
        QUERY, DOCS, rerankers={"overlap": OverlapReranker(), "scripted": scripted}
    )
    assert [c.name for c in comparison.columns] == [VECTOR_ORDER, "overlap", "scripted"]
    assert comparison[VECTOR_ORDER].order == [0, 1, 2]
    assert comparison["overlap"].order == [1, 0, 2]
    assert comparison["scripted"].order == [2, 0, 1]
    top = comparison["overlap"].ranking[0]
    assert top.score == pytest.approx(2 / 3) and top.stage is Stage.RELEVANT
    assert comparison["overlap"].duration_ms is not None and comparison["overlap"].duration_ms >= 0
    assert comparison[VECTOR_ORDER].duration_ms is None


def test_table_shows_orders_side_by_side_and_the_texts() -> None:
    comparison = compare(
        QUERY, DOCS, rerankers={"overlap": OverlapReranker()}, vector_scores=[0.9, 0.8, 0.7]
    )
    lines = str(comparison).splitlines()
    assert lines[0] == f"query: {QUERY}"
    assert lines[1].split() == ["rank", "vector", "order", "overlap"]
    assert lines[2].split() == ["1", "[0]", "0.900", "[1]", "0.667", "relevant"]
    assert lines[3].split()[:3] == ["2", "[1]", "0.800"] and "[0]" in lines[3]
    assert lines[5].startswith("time") and lines[5].endswith(" ms")
    assert lines[-3:] == [f"[{i}] {text}" for i, text in enumerate(DOCS)]


def test_to_dict_is_json_and_round_trips_the_orders() -> None:
    comparison = compare(QUERY, DOCS, rerankers=[OverlapReranker()], top_n=2)
    data = json.loads(json.dumps(comparison.to_dict()))
    assert data["query"] == QUERY and data["documents"] == DOCS
    vector, overlap = data["columns"]
    assert vector["name"] == VECTOR_ORDER and [r["index"] for r in vector["ranking"]] == [0, 1]
    assert overlap["name"] == "OverlapReranker(overlap-test)"
    assert [r["index"] for r in overlap["ranking"]] == [1, 0]
    assert overlap["ranking"][0] == {
        "rank": 1,
        "index": 1,
        "score": pytest.approx(2 / 3),
        "stage": "relevant",
    }


def test_same_names_are_told_apart() -> None:
    comparison = compare(QUERY, DOCS, rerankers=[OverlapReranker(), OverlapReranker()])
    names = [c.name for c in comparison.columns]
    assert names == [
        VECTOR_ORDER,
        "OverlapReranker(overlap-test)",
        "OverlapReranker(overlap-test) #2",
    ]


def test_a_backend_error_fills_its_column_only() -> None:
    rerankers = {
        "down": ScriptedReranker(error=BackendUnavailableError("down")),
        "bad": RawReranker([RerankResult(0, 0.5, Stage.PARTIAL)]),  # ranks one of three
        "overlap": OverlapReranker(),
    }
    comparison = compare(QUERY, DOCS, rerankers=rerankers)
    assert comparison["down"].error == "BackendUnavailableError: down"
    assert comparison["down"].ranking == ()
    assert (
        comparison["bad"].error is not None and "MalformedResponseError" in comparison["bad"].error
    )
    assert comparison["overlap"].order == [1, 0, 2]
    assert "failed: BackendUnavailableError: down" in str(comparison)


def test_other_errors_propagate() -> None:
    with pytest.raises(RuntimeError):
        compare(QUERY, DOCS, rerankers=[ScriptedReranker(error=RuntimeError("bug"))])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query": None}, "query"),
        ({"documents": "one string"}, "documents"),
        ({"rerankers": []}, "at least one"),
        ({"rerankers": [object()]}, "neither rerank"),
        ({"top_n": 0}, "top_n"),
        ({"vector_scores": [1.0]}, "one number per document"),
        ({"vector_scores": [1.0, float("nan"), 0.0]}, "finite"),
    ],
)
def test_bad_input_is_invalid_input(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "query": QUERY,
        "documents": DOCS,
        "rerankers": [OverlapReranker()],
    }
    arguments.update(kwargs)
    with pytest.raises(InvalidInputError, match=message):
        compare(**arguments)  # type: ignore[arg-type]


def test_vector_scores_as_vector_stores_return_them() -> None:
    # Issue 27: numpy float32 scores were refused and a generator gave a raw TypeError.
    numpy = pytest.importorskip("numpy")
    given: list[object] = [
        numpy.array([0.8, 0.5, 0.25], dtype=numpy.float32),
        [numpy.float32(0.8), numpy.float16(0.5), numpy.int64(0)],
        (score for score in (0.8, 0.5, 0.25)),
        (0.8, 0.5, 0.25),
    ]
    for scores in given:
        column = compare(QUERY, DOCS, [OverlapReranker()], vector_scores=scores)[VECTOR_ORDER]  # type: ignore[arg-type]
        values = [row.score for row in column.ranking]
        assert values[:2] == [pytest.approx(0.8), pytest.approx(0.5)]
        assert all(type(value) is float for value in values)  # plain JSON numbers
    for bad, message in [
        ((score for score in (0.8, 0.5)), "one number per document: got 2 for 3"),
        (iter(["0.8", "0.5", "0.2"]), r"vector_scores\[0\] must be a finite number"),
        (numpy.array([0.8, numpy.inf, 0.2]), r"vector_scores\[1\] must be a finite number"),
        (0.5, "sequence or iterable of numbers"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            compare(QUERY, DOCS, [OverlapReranker()], vector_scores=bad)  # type: ignore[arg-type]


class Tied:
    """Duck-typed: all three documents tie; the answer lists them in reverse order."""

    def rerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        return [RerankResult(i, 0.5, Stage.PARTIAL) for i in reversed(range(len(documents)))]


async def test_ties_keep_input_order_in_every_column() -> None:
    assert compare(QUERY, DOCS, {"tied": Tied()})["tied"].order == [0, 1, 2]
    assert (await acompare(QUERY, DOCS, {"tied": Tied()}, top_n=2))["tied"].order == [0, 1]


class AsyncOnly:
    def __init__(self) -> None:
        self.calls: list[int] = []

    async def arerank(
        self, query: str, documents: Sequence[str], top_n: int | None = None
    ) -> list[RerankResult]:
        self.calls.append(len(documents))
        return OverlapReranker().rerank(query, documents)


async def test_acompare_awaits_arerank_and_warms_up_untimed() -> None:
    backend = OverlapReranker()
    async_only = AsyncOnly()
    comparison = await acompare(
        QUERY, DOCS, rerankers={"overlap": backend, "async": async_only}, warm_up=True
    )
    assert [call[0] for call in backend.calls] == ["arerank", "arerank"]
    assert [len(call[2]) for call in backend.calls] == [1, 3]  # warm-up, then the call
    assert async_only.calls == [1, 3]
    assert comparison["async"].order == comparison["overlap"].order == [1, 0, 2]


async def test_compare_in_a_running_loop_asks_for_acompare() -> None:
    with pytest.raises(InvalidInputError, match="acompare"):
        compare(QUERY, DOCS, rerankers=[AsyncOnly()])


def test_exported_lazily() -> None:
    assert isinstance(compare(QUERY, DOCS, rerankers=[OverlapReranker()]), Comparison)
    assert "compare" in memos_rerank_integrations.__all__
    code = (
        "import sys, memos_rerank_integrations as m; "
        "assert 'memos_rerank_integrations._compare' not in sys.modules; "
        "m.compare; assert 'memos_rerank_integrations._compare' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=SUBPROCESS_ENV)


# -- memos-rerank compare ----------------------------------------------------------------


def test_cli_compares_the_packaged_embedding_model_with_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "memories.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": text, "score": 0.5 - i / 10}) for i, text in enumerate(DOCS))
    )
    argv = ["compare", "--query", "What are the user's hobbies?", "--input", str(path)]
    code = cli_main(
        [*argv, "--backend", "embedding", "--dtype", "float32", "--top-n", "2", "--json"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    vector, minilm = data["columns"]
    assert vector["name"] == "vector order" and [r["score"] for r in vector["ranking"]] == [
        0.5,
        0.4,
    ]
    assert minilm["name"] == "embedding"
    assert minilm["ranking"][0]["index"] == 1  # badminton
    assert len(minilm["ranking"]) == 2


def test_cli_table_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(DOCS) + "\n"))
    code = cli_main(["compare", "--query", "hobbies badminton", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[1].split() == ["rank", "vector", "order", "embedding"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backend", "nope"], "Unknown backend 'nope'"),
        (["--backend", "cross-encoder"], "cross-encoder needs a model"),
        (["--backend", "http"], "http needs the server's URL"),
        (["--input", "/nonexistent/file.txt"], "No such file"),
    ],
)
def test_cli_user_errors_are_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs.txt"
    docs.write_text("one\ntwo\n")
    base = ["compare", "--query", "q", "--input", str(docs)]
    code = cli_main([*base, *argv])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_compare_help_is_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["compare", "--help"])
    assert exit_info.value.code == 0
    assert "KIND[=MODEL_OR_URL]" in capsys.readouterr().out


def test_table_lists_only_the_documents_it_shows() -> None:
    docs = [f"memory number {i}" for i in range(10)]
    scores = [0.0] * 9 + [1.0]
    comparison = compare("q", docs, rerankers={"s": ScriptedReranker(scores)}, top_n=2)
    legend = [line for line in str(comparison).splitlines() if line.startswith("[")]
    assert legend == ["[0] memory number 0", "[1] memory number 1", "[9] memory number 9"]
    assert len(comparison.to_dict()["documents"]) == 10


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"one\n\xff\xfe two\n", "line 2, byte 1: not valid UTF-8"),
        (b'{"text": "bad \\ud800 text"}\n', "lone surrogate"),
        (b'{"text": ' + b"[" * 100_000 + b"\n", "line 1"),
    ],
    ids=["not-utf-8", "lone-surrogate", "deep-json"],
)
@pytest.mark.parametrize("command", ["compare", "rerank"])
def test_cli_bad_input_is_one_line_in_a_real_process(
    content: bytes, message: str, command: str, tmp_path: Path
) -> None:
    path = tmp_path / "docs.txt"  # the format is detected from the first line
    path.write_bytes(content)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "memos_rerank_integrations.cli",
            "compare",
            "--query",
            "q",
            "--input",
            str(path),
        ],
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_cli_errors_replace_reads_what_it_can(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "docs.txt"
    path.write_bytes(b"User likes playing badminton.\nbad \xff byte\n")
    code = cli_main(
        [
            "compare",
            "--query",
            "hobbies",
            "--input",
            str(path),
            "--errors",
            "replace",
            "--backend",
            "embedding",
            "--dtype",
            "float32",
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["documents"] == ["User likes playing badminton.", "bad \ufffd byte"]
