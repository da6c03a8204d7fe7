"""``memos-rerank demo`` runs end to end offline: it falls back from the default Qwen
model to all-MiniLM-L6-v2 quickly, says so, and prints every memory with its score
and stage through both frameworks. Run as a user runs it, in a child process."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from memos_rerank_integrations import QwenReranker
from memos_rerank_integrations.cli._demo import main
from memos_rerank_integrations.cli._examples import BUSINESS_TRIP_QUERY, EXAMPLES, MEM0_PLAYBOOKS
from memos_rerank_integrations.testing import build_tiny_qwen_reranker

from ..support.backends import SUBPROCESS_ENV

DATA = Path(__file__).resolve().parents[1] / "data" / "examples.json"
LIQUOR, HOBBIES = (example.query for example in EXAMPLES)
MEMORIES = EXAMPLES[1].documents
STAGES = {"irrelevant", "weak", "partial", "relevant", "highly_relevant"}
ROW = re.compile(r"^    (\d+)\. (\d\.\d{4})  (\w+)\s+(?:\[(\d\.\d\d)\] )?(.+)$")


@dataclass(frozen=True)
class Row:
    rank: int
    score: float
    stage: str
    text: str


def run_demo(*args: str, hf_home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    child_env = {**SUBPROCESS_ENV, "HF_HOME": str(hf_home), **env}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT"):
        if name not in env:
            child_env.pop(name, None)
    return subprocess.run(
        # What the `memos-rerank` console script runs: cli.main -> demo.
        [sys.executable, "-m", "memos_rerank_integrations.cli", "demo", *args],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def sections(stdout: str) -> dict[str, dict[str, list[Row]]]:
    """{framework: {query: rows}} parsed from the demo's output."""
    parsed: dict[str, dict[str, list[Row]]] = {}
    framework = query = ""
    for line in stdout.splitlines():
        if line.startswith(("LangChain:", "LlamaIndex:")):
            framework = line.split(":")[0]
            parsed[framework] = {}
        elif line.startswith("  Query: "):
            query = line.removeprefix("  Query: ")
            parsed[framework][query] = []
        elif match := ROW.match(line):
            rank, score, stage, _, text = match.groups()
            parsed[framework][query].append(Row(int(rank), float(score), stage, text))
    return parsed


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_complete(parsed: dict[str, dict[str, list[Row]]], per_query: int) -> None:
    assert set(parsed) == {"LangChain", "LlamaIndex"}
    for by_query in parsed.values():
        assert list(by_query) == [LIQUOR, HOBBIES, BUSINESS_TRIP_QUERY]
        for rows in by_query.values():
            assert [row.rank for row in rows] == list(range(1, per_query + 1))
            assert len({row.text for row in rows}) == per_query
            assert {row.text for row in rows} <= set(MEMORIES)
            assert all(row.stage in STAGES and 0.0 <= row.score <= 1.0 for row in rows)
            assert [row.score for row in rows] == sorted((row.score for row in rows), reverse=True)


@pytest.fixture(scope="module")
def empty_hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


def test_offline_falls_back_fast_and_ranks_the_baijiu_memory_first(empty_hf_home: Path) -> None:
    # No HF_HUB_OFFLINE: the demo has to notice by itself that the Hub (here a
    # loopback port nobody listens on) cannot be reached, and not wait for it.
    started = time.monotonic()
    proc = run_demo(hf_home=empty_hf_home, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert elapsed < 120  # alone on two cores: under 10 s
    out = proc.stdout
    assert "cannot be reached" in out
    assert "Could not load Qwen/Qwen3-Reranker-0.6B" in out
    assert "Model: sentence-transformers/all-MiniLM-L6-v2 (EmbeddingReranker" in out
    parsed = sections(out)
    assert_complete(parsed, per_query=len(MEMORIES))
    for by_query in parsed.values():
        assert by_query[LIQUOR][0].text == "User prefers Jiangxiang-flavored baijiu."
        assert by_query[HOBBIES][0].text == "User likes playing badminton."
        assert "business trip" in by_query[BUSINESS_TRIP_QUERY][0].text
    # Both frameworks print the same reranking.
    assert parsed["LangChain"] == parsed["LlamaIndex"]


def test_runs_the_qwen_path_on_a_local_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process (the subprocess run above covers the real command line).
    model = build_tiny_qwen_reranker(tmp_path / "tiny-qwen")
    assert main(["--model", str(model), "--top-n", "2"]) == 0
    out = capsys.readouterr().out
    assert f"Model: {model} (QwenReranker)" in out
    assert "Falling back" not in out and "cannot be reached" not in out
    parsed = sections(out)
    assert_complete(parsed, per_query=2)
    # The printed scores are the backend's own (to the printed precision).
    expected = QwenReranker(model).rerank(LIQUOR, list(MEMORIES), top_n=2)
    printed = parsed["LangChain"][LIQUOR]
    assert [row.text for row in printed] == [MEMORIES[r.index] for r in expected]
    assert [row.score for row in printed] == pytest.approx([r.score for r in expected], abs=1e-4)


def test_qwen_only_without_the_model_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # --offline sets it; restored afterwards
    missing = str(tmp_path / "no-such-model")
    assert main(["--backend", "qwen", "--model", missing, "--offline"]) == 1
    captured = capsys.readouterr()
    assert f"Could not load {missing}: ModelLoadError" in captured.out
    assert "Try --backend embedding" in captured.err
    assert "LangChain:" not in captured.out


def test_bad_options_are_rejected_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--top-n", "0"])
    assert exit_info.value.code == 2
    assert "--top-n: must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--backend", "nope"])
    assert exit_info.value.code == 2


def test_the_shipped_examples_match_the_reference_file() -> None:
    reference = json.loads(DATA.read_text(encoding="utf-8"))
    assert [
        {"query": example.query, "documents": list(example.documents)} for example in EXAMPLES
    ] == reference["examples"]
    assert list(MEM0_PLAYBOOKS) == reference["mem0_playbooks"]


def test_without_langchain_classic_the_compressor_runs_on_the_retriever(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As after `pip install '.[langchain]'`, which brings langchain-core only.
    monkeypatch.setitem(sys.modules, "langchain_classic.retrievers", None)
    assert main(["--backend", "embedding", "--top-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "pip install langchain-classic" in out
    parsed = sections(out)
    assert parsed["LangChain"][LIQUOR] == parsed["LlamaIndex"][LIQUOR]
    assert parsed["LangChain"][LIQUOR][0].text == "User prefers Jiangxiang-flavored baijiu."


def test_a_missing_framework_is_reported_before_any_model_loads(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_index", None)
    started = time.monotonic()
    assert main([]) == 1
    assert time.monotonic() - started < 1.0
    captured = capsys.readouterr()
    assert "needs llama-index-core" in captured.err
    assert "memos-rerank-integrations[all]" in captured.err
    assert "Loading" not in captured.out
