"""The ``memos-rerank`` command line, with tiny real models."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cohere
import httpx
import pytest
import torch

from memos_rerank_integrations import CrossEncoderReranker, EmbeddingReranker, QwenReranker
from memos_rerank_integrations.cli import API_KEY_ENV, _parser, main
from memos_rerank_integrations.testing import build_tiny_cross_encoder, build_tiny_qwen_reranker

FP32 = ["--dtype", "float32"]  # bfloat16 scores move with batch composition
SRC = Path(__file__).resolve().parents[2] / "src"
QUERY = "What are the user's hobbies?"
DOCUMENTS = [
    "User likes playing badminton.",
    "User is a backend developer in Hangzhou.",
    "User prefers concise replies.",
    "User prefers Jiangxiang-flavored baijiu.",
]


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("cli") / "tiny-cross-encoder")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_reranker(tmp_path_factory.mktemp("cli") / "tiny-qwen")


def run_cli(
    argv: list[str], capsys: pytest.CaptureFixture[str], stdin: str | None = None
) -> tuple[int, str, str]:
    previous = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(argv)
    finally:
        sys.stdin = previous
    out, err = capsys.readouterr()
    return code, out, err


def test_rerank_plain_lines_from_stdin(
    cross_encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = f"{DOCUMENTS[0]}\n\n{DOCUMENTS[1]}\r\n   \n{DOCUMENTS[2]}\n{DOCUMENTS[3]}"
    argv = ["rerank", "--query", QUERY, "--backend", "cross-encoder"]
    code, out, _ = run_cli([*argv, "--model", str(cross_encoder_dir), *FP32], capsys, stdin=text)
    assert code == 0
    output = json.loads(out)
    expected = CrossEncoderReranker(cross_encoder_dir, dtype="float32").rerank(QUERY, DOCUMENTS)
    assert [r["index"] for r in output["results"]] == [e.index for e in expected]
    assert [r["score"] for r in output["results"]] == pytest.approx(
        [e.score for e in expected], abs=1e-5
    )
    assert [r["rank"] for r in output["results"]] == [1, 2, 3, 4]
    # Blank lines are skipped; "line" points back into the input.
    lines = {r["text"]: r["line"] for r in output["results"]}
    assert lines == {DOCUMENTS[0]: 1, DOCUMENTS[1]: 3, DOCUMENTS[2]: 5, DOCUMENTS[3]: 6}
    assert all("record" not in r for r in output["results"])


def test_rerank_jsonl_file_keeps_records_and_top_n(
    qwen_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "memories.txt"
    records = [{"id": f"m{i}", "text": text, "tags": ["x"]} for i, text in enumerate(DOCUMENTS)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    argv = ["rerank", "--query", QUERY, "--model", str(qwen_dir), *FP32, "--input", str(path)]
    code, out, _ = run_cli([*argv, "--top-n", "2"], capsys)
    assert code == 0
    results = json.loads(out)["results"]
    expected = QwenReranker(qwen_dir, dtype="float32").rerank(QUERY, DOCUMENTS, top_n=2)
    assert [r["index"] for r in results] == [e.index for e in expected]
    assert [r["score"] for r in results] == pytest.approx([e.score for e in expected], abs=1e-5)
    assert [r["record"] for r in results] == [records[e.index] for e in expected]
    assert [r["stage"] for r in results] == [e.stage.label for e in expected]


def test_rerank_embedding_backend_with_its_default_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["rerank", "--query", QUERY, "--backend", "embedding", *FP32]
    code, out, _ = run_cli(argv, capsys, stdin="\n".join(DOCUMENTS))
    assert code == 0
    results = json.loads(out)["results"]
    expected = EmbeddingReranker(dtype="float32").rerank(QUERY, DOCUMENTS)
    assert [r["index"] for r in results] == [e.index for e in expected]
    assert [r["score"] for r in results] == pytest.approx([e.score for e in expected], abs=1e-5)
    assert results[0]["text"] == "User likes playing badminton."


def test_format_lines_treats_json_as_plain_text(
    cross_encoder_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    argv = [
        "rerank",
        "--query",
        "q",
        "--backend",
        "cross-encoder",
        "--model",
        str(cross_encoder_dir),
    ]
    code, out, _ = run_cli([*argv, "--input", str(path), "--format", "lines"], capsys)
    assert code == 0
    assert sorted(r["text"] for r in json.loads(out)["results"]) == [
        '{"text": "a"}',
        '{"text": "b"}',
    ]


def test_long_input_shows_progress_on_stderr_only(
    cross_encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    documents = [f"memory number {i} about topic {i % 7}" for i in range(150)]
    argv = ["rerank", "--query", "topic 3", "--backend", "cross-encoder"]
    code, out, err = run_cli(
        [*argv, "--model", str(cross_encoder_dir), *FP32], capsys, stdin="\n".join(documents)
    )
    assert code == 0
    results = json.loads(out)["results"]  # stdout is nothing but the JSON
    assert sorted(r["index"] for r in results) == list(range(150))
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    expected = CrossEncoderReranker(cross_encoder_dir, dtype="float32").rerank("topic 3", documents)
    assert {r["index"]: r["score"] for r in results} == pytest.approx(
        {e.index: e.score for e in expected}
    )
    assert "150" in err and "reranking" in err


def test_invalid_jsonl_line_is_a_one_line_error(
    cross_encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "rerank",
        "--query",
        "q",
        "--backend",
        "cross-encoder",
        "--model",
        str(cross_encoder_dir),
    ]
    code, out, err = run_cli(argv, capsys, stdin='{"text": "ok"}\n{"title": "no text"}\n')
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and "line 2" in err and "'text'" in err


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["rerank", "--query", "q", "--model", "/no/such/model"], "doc\n", "Could not load model"),
        (
            ["rerank", "--query", "q", "--backend", "cross-encoder"],
            "doc\n",
            "cross-encoder needs a model",
        ),
        (
            ["rerank", "--query", "q", "--backend", "embedding", "--instruction", "x"],
            "doc\n",
            "--instruction applies to --backend qwen only",
        ),
        (["rerank", "--query", " ", "--model", "x"], "doc\n", "--query must not be empty"),
        (["rerank", "--query", "q", "--model", "x"], "\n\n", "No documents in stdin"),
        (["rerank", "--query", "q", "--input", "/no/such/file.txt"], None, "No such file"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    argv: list[str], stdin: str | None, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(argv, capsys, stdin=stdin)
    assert code == 1
    assert out == ""
    assert message in err
    assert err.startswith("memos-rerank: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_option_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["rerank", "--query", "q", "--top-n", "0"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_every_command_is_one_tree(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("serve", "rerank", "compare", "demo"))


@pytest.mark.parametrize("spelling", ["cross-encoder", "cross_encoder"])
def test_backend_spellings_are_aliases_of_one_registry_name(
    spelling: str, cross_encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["rerank", "--query", QUERY, "--backend", spelling, "--model", str(cross_encoder_dir)]
    code, out, err = run_cli(argv, capsys, stdin="one\ntwo\n")
    assert code == 0, err
    assert json.loads(out)["backend"] == "cross_encoder"


@pytest.mark.parametrize("command", ["rerank", "compare", "demo"])
def test_bad_top_n_is_a_usage_error_in_every_command(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [command, "--query", "q", "--top-n", "0"]
            if command != "demo"
            else [command, "--top-n", "0"]
        )
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_demo_help_is_the_demos_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--backend {auto,qwen,embedding}" in out and "--offline" in out


# -- serve, as a real process --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_serve(args: list[str], env_key: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    env.pop(API_KEY_ENV, None)
    if env_key is not None:
        env[API_KEY_ENV] = env_key
    return subprocess.Popen(
        [sys.executable, "-m", "memos_rerank_integrations.cli", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_healthy(process: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


def test_serve_answers_then_stops_cleanly_on_sigterm(cross_encoder_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        "--model",
        str(cross_encoder_dir),
        "--backend",
        "cross-encoder",
        "--port",
        str(port),
        *FP32,
    ]
    serve_args = [*args, "--model-name", "tiny-ce", "--header-timeout", "3"]
    # A key read from a secret file ends with a newline: it is stripped.
    process = start_serve([*serve_args, "--limit-concurrency", "8"], env_key="env-secret-key\n")
    try:
        wait_healthy(process, url)
        # 12 connections that never send a request, against a limit of 8: each new
        # connection over the limit closes the one idle longest, so a real client
        # gets in; the rest are closed after --header-timeout.
        opened = time.monotonic()
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        for sock in idle[:6]:
            assert sock.recv(16) == b""  # evicted
        for sock in idle[6:]:
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(16)  # still open: the header timeout has not passed yet
        assert time.monotonic() - opened < 3, "too slow to check the eviction"
        for sock in idle[6:]:
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(16) == b""
        assert time.monotonic() - opened < 9  # 3 s, not uvicorn's never or our default 10
        for sock in idle:
            sock.close()
        client = cohere.ClientV2(api_key="env-secret-key", base_url=url, max_retries=0, timeout=30)
        response = client.rerank(model="tiny-ce", query=QUERY, documents=DOCUMENTS)
        expected = CrossEncoderReranker(cross_encoder_dir, dtype="float32").rerank(QUERY, DOCUMENTS)
        assert [r.index for r in response.results] == [e.index for e in expected]
        assert [r.relevance_score for r in response.results] == pytest.approx(
            [e.score for e in expected]
        )
        # The key came from the environment variable.
        body = {"query": QUERY, "documents": DOCUMENTS}
        assert httpx.post(f"{url}/rerank", json=body, timeout=10).status_code == 401
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["model"] == "tiny-ce"
        metrics = httpx.get(f"{url}/metrics", timeout=10)
        assert 'memos_rerank_requests_total{method="POST",route="/v2/rerank",status="200"} 1.0' in (
            metrics.text
        )
    finally:
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert time.monotonic() - started < 10
    assert "Application shutdown complete" in err
    assert "Traceback" not in err
    assert "env-secret-key" not in out + err


def test_serve_with_a_bad_model_exits_1_with_one_line(tmp_path: Path) -> None:
    process = start_serve(["--model", str(tmp_path / "missing"), "--port", str(free_port())])
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("memos-rerank: error:")]
    assert len(errors) == 1 and "Could not load model" in errors[0]
    assert "Traceback" not in err


def test_serve_refuses_a_causal_lm_as_a_cross_encoder_before_serving(qwen_dir: Path) -> None:
    """An original Qwen3-Reranker has no classification head: served as a cross-encoder
    it would answer with a random head, different in every process."""
    port = free_port()
    process = start_serve(
        ["--backend", "cross-encoder", "--model", str(qwen_dir), "--port", str(port)]
    )
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("memos-rerank: error:")]
    assert len(errors) == 1, err
    assert "Qwen3ForCausalLM" in errors[0] and "QwenReranker (backend 'qwen')" in errors[0]
    assert "Uvicorn running" not in err and "Traceback" not in err


# -- input that is not valid text, as a real process ------------------------------------


def run_process(argv: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    env.pop(API_KEY_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "memos_rerank_integrations.cli", *argv],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
    )


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1, err
    assert result.stdout == b""
    assert "Traceback" not in err
    assert err.startswith("memos-rerank: error: ") and err.count("\n") == 1, err
    return err


_SCRIPT = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("TEARDOWN\\n"))
sys.argv = ["memos-rerank", *sys.argv[1:]]
from memos_rerank_integrations.cli import script
script()
"""


def test_the_script_ends_without_the_interpreter_teardown(qwen_dir: Path) -> None:
    """``memos-rerank`` (the console script and ``python -m``) ends once its output is
    flushed: no ``atexit`` handler runs (nor the rest of the teardown after them),
    nothing written is lost and the exit code is the command's."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    documents = [f"Memory {i}: {DOCUMENTS[i % len(DOCUMENTS)]} " + "x" * 200 for i in range(300)]
    argv = ["rerank", "--query", QUERY, "--model", str(qwen_dir), *FP32, "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *argv],
        input="\n".join(documents).encode(),
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert b"TEARDOWN" not in done.stderr
    output = json.loads(done.stdout)  # all of it: over 64 KiB through a pipe
    assert len(done.stdout) > 65536
    assert sorted(r["index"] for r in output["results"]) == list(range(300))
    failed = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "rerank", "--query", "q", "--model", str(qwen_dir)],
        input=b"",
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert failed.returncode == 1
    assert failed.stderr.decode().startswith("memos-rerank: error: No documents")
    assert b"TEARDOWN" not in failed.stderr


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_non_utf8_input_is_a_one_line_error(source: str, tmp_path: Path) -> None:
    garbage = b"fine line\nsecond \xff\xfe\x00 line\n" + bytes(range(256))
    path = tmp_path / "garbage.bin"
    path.write_bytes(garbage)
    argv = ["rerank", "--query", "q", "--backend", "cross-encoder", "--model", "unused"]
    if source == "file":
        result = run_process([*argv, "--input", str(path)])
    else:
        result = run_process(argv, stdin=garbage)
    err = one_error_line(result)
    assert "line 2, byte 8: not valid UTF-8 (byte 0xff)" in err
    assert "--errors replace" in err


def test_jsonl_with_a_lone_surrogate_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "memories.jsonl"
    path.write_text(
        '{"text": "fine"}\n{"text": "half \\ud800 a pair", "id": 2}\n', encoding="utf-8"
    )
    argv = ["rerank", "--query", "q", "--backend", "cross-encoder", "--model", "unused"]
    err = one_error_line(run_process([*argv, "--input", str(path)]))
    assert f"{path} line 2: character 6 is a lone surrogate (U+D800)" in err


def test_a_query_with_undecodable_bytes_is_a_one_line_error() -> None:
    # Undecodable bytes in argv reach Python as lone surrogates (surrogateescape).
    argv = ["rerank", "--query", "caf\udce9", "--backend", "cross-encoder", "--model", "unused"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "memos_rerank_integrations.cli", *(os.fsencode(a) for a in argv)],
        input=b"doc\n",
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert "--query: character 4 is a lone surrogate (U+DCE9)" in one_error_line(result)


def test_errors_replace_scores_what_it_can(cross_encoder_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"text": "User likes playing badminton.", "tag": "half \\udc00"}\n'
        b'{"text": "caf\xe9 on Sunday"}\n'
    )
    argv = ["rerank", "--query", QUERY, "--backend", "cross-encoder", "--model"]
    result = run_process(
        [*argv, str(cross_encoder_dir), *FP32, "--input", str(path), "--errors", "replace"]
    )
    assert result.returncode == 0, result.stderr.decode()
    texts = {r["text"]: r for r in json.loads(result.stdout)["results"]}
    assert set(texts) == {"User likes playing badminton.", "caf\ufffd on Sunday"}
    assert texts["User likes playing badminton."]["record"]["tag"] == "half \ufffd"


def test_serve_refuses_an_unusable_key_before_loading_the_model() -> None:
    for key in ("ключ", "key\x07"):
        result = run_process(["serve", "--model", "/no/such/model", "--api-key", key])
        err = one_error_line(result)
        assert "api_key holds a" in err and "Could not load" not in err
        assert key not in err


def test_serve_defaults_are_the_servers() -> None:
    from memos_rerank_integrations import server

    args = _parser().parse_args(["serve", "--model", "m"])
    assert args.max_request_tokens == server.DEFAULT_MAX_REQUEST_TOKENS
    assert args.limit_concurrency == server.DEFAULT_LIMIT_CONCURRENCY
    assert args.header_timeout == server.DEFAULT_HEADER_TIMEOUT
    assert args.shutdown_timeout == server.DEFAULT_SHUTDOWN_TIMEOUT
    assert args.write_timeout is None  # the header timeout, as in server.config
    assert args.max_query_tokens == 2048  # MemOS's query limit
    assert args.no_metrics is False
    assert args.model_workers is None  # auto
    for spelling in ("auto", " AUTO "):
        parsed = _parser().parse_args(["serve", "--model", "m", "--model-workers", spelling])
        assert parsed.model_workers is None
    assert args.max_batch_tokens is None  # per device (below)


def test_serve_bounds_fused_batches_by_tokens_on_a_cpu() -> None:
    # On a CPU a long request is scored in slices, so the short ones queued with it
    # need not wait for all of it; on CUDA batches are bounded by documents only.
    from memos_rerank_integrations.cli._serve import _default_batch_tokens

    assert _default_batch_tokens("cpu") == 2048
    if not torch.cuda.is_available():
        assert _default_batch_tokens(None) == 2048


def test_auto_model_workers_are_two_on_cpu_for_a_model_with_replicas() -> None:
    from memos_rerank_integrations.cli._serve import _auto_model_workers

    class Replicated:
        def replica(self) -> Replicated:
            return self

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _auto_model_workers(Replicated(), "cpu") == 2
        assert _auto_model_workers(object(), "cpu") == 1  # no replicas: turns only
        torch.set_num_threads(1)
        assert _auto_model_workers(Replicated(), "cpu") == 1  # nothing to share
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "timeouts",
    [["--write-timeout", "1"], ["--write-timeout", "60", "--shutdown-timeout", "1"]],
    ids=["write-timeout", "shutdown-timeout"],
)
def test_serve_exits_promptly_on_sigterm_with_a_client_that_never_reads(
    cross_encoder_dir: Path, timeouts: list[str]
) -> None:
    """A client that asks for a large answer and never reads it: with --write-timeout
    its connection is aborted, with --shutdown-timeout its request is cancelled, so
    SIGTERM ends the server in seconds either way (the defaults would take 10 s)."""
    port = free_port()
    limits = ["--max-body-bytes", str(64 * 1024 * 1024), "--max-request-tokens", "none"]
    model = ["--model", str(cross_encoder_dir), "--backend", "cross-encoder", *FP32]
    process = start_serve(
        [*model, "--port", str(port), *limits, "--max-documents", "4000", *timeouts]
    )
    try:
        wait_healthy(process, f"http://127.0.0.1:{port}")
        documents = [f"memory {i} " + "x" * 6000 for i in range(1500)]
        body = json.dumps(
            {"query": QUERY, "documents": documents, "return_documents": True}
        ).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        head = (
            f"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        sock.settimeout(60)
        assert sock.recv(1, socket.MSG_PEEK)  # the answer has begun; it is never read
        time.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert time.monotonic() - started < 6
        assert process.returncode == 0
        sock.close()
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.parametrize("workers", [["--model-workers", "2"], []], ids=["2", "auto"])
def test_serve_runs_its_model_workers_on_shares_of_the_cores(
    qwen_dir: Path, workers: list[str]
) -> None:
    """Two model workers, asked for or by default (auto: two on CPU), score the tiny
    Qwen as one would, the first on every core, the second on its share."""
    if torch.get_num_threads() < 2:
        pytest.skip("auto runs one worker where torch has one thread")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_serve(["--model", str(qwen_dir), "--port", str(port), *FP32, *workers])
    try:
        wait_healthy(process, url)
        assert httpx.get(f"{url}/health", timeout=10).json()["model_workers"] == 2
        body = {"query": QUERY, "documents": DOCUMENTS}
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(lambda _: httpx.post(f"{url}/rerank", json=body, timeout=60), range(4))
            )
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    expected = QwenReranker(qwen_dir, dtype="float32").rerank(QUERY, DOCUMENTS)
    for answer in answers:
        assert answer.status_code == 200
        got = answer.json()["results"]
        assert [r["index"] for r in got] == [e.index for e in expected]
        assert [r["relevance_score"] for r in got] == pytest.approx([e.score for e in expected])
    pattern = r"2 model workers: the first on up to (\d+) torch thread\(s\), the others on (\d+)"
    found = re.search(pattern, err)
    assert found is not None, err
    cores = torch.get_num_threads()
    assert (int(found.group(1)), int(found.group(2))) == (cores, max(1, cores // 2))
    assert process.returncode == 0, err


def test_serve_runs_one_worker_for_a_model_without_replicas(cross_encoder_dir: Path) -> None:
    port = free_port()
    args = ["--model", str(cross_encoder_dir), "--backend", "cross-encoder", "--port", str(port)]
    process = start_serve([*args, *FP32, "--model-workers", "2"])
    try:
        wait_healthy(process, f"http://127.0.0.1:{port}")
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["model_workers"] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert re.search(
        r"--model-workers 2 ignored: the cross.encoder backend's model has no replicas", err
    )
    assert "model workers:" not in err  # torch's threads were not split
    assert process.returncode == 0, err
