"""The command line's bounds: every operator option and every input is checked before
any model loads or any more input is read, and every way a command can end is a
documented exit code with at most one line of error (issue 27)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from memos_rerank_integrations.cli import API_KEY_ENV, _input, _parser, main
from memos_rerank_integrations.cli._input import (
    MAX_DOCUMENTS,
    MAX_INTEGER_DIGITS,
    MAX_JSON_DEPTH,
    MAX_LINE_BYTES,
    MAX_QUERY_LENGTH,
)
from memos_rerank_integrations.cli._options import MAX_COUNT
from memos_rerank_integrations.testing import build_tiny_cross_encoder, build_tiny_qwen_reranker

SRC = Path(__file__).resolve().parents[2] / "src"
FP32 = ["--dtype", "float32"]
MISSING_MODEL = "/no/such/model"


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("limits") / "tiny-cross-encoder")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_reranker(tmp_path_factory.mktemp("limits") / "tiny-qwen")


class Stdin(io.TextIOWrapper):
    """A real stdin-like text stream over bytes (``.buffer`` holds them, as for a
    process), that counts the bytes the command read."""

    def __init__(self, data: bytes) -> None:
        self.raw_bytes = _CountingBytes(data)
        super().__init__(self.raw_bytes, encoding="utf-8")

    @property
    def consumed(self) -> int:
        return self.raw_bytes.consumed


class _CountingBytes(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        self.consumed += len(line)
        return line


def run_main(
    argv: list[str], capsys: pytest.CaptureFixture[str], stdin: bytes | None = None
) -> tuple[int, str, str]:
    previous = sys.stdin
    if stdin is not None:
        sys.stdin = Stdin(stdin)
    try:
        code = main(argv)
    finally:
        sys.stdin = previous
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 1, err
    assert out == ""
    assert err.startswith("memos-rerank: error: ") and err.count("\n") == 1, err
    return err


def environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    env.pop(API_KEY_ENV, None)
    return env


def run_process(
    argv: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memos_rerank_integrations.cli", *argv],
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        env=env or environment(),
        timeout=120,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- operator options: out of range is a usage error (exit 2), before anything loads ------

SERVE = ["serve", "--model", MISSING_MODEL]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        ([*SERVE, "--port", "0"], "--port"),
        ([*SERVE, "--port", "65536"], "--port"),
        ([*SERVE, "--port", "9" * 5000], "--port"),
        ([*SERVE, "--max-documents", str(MAX_COUNT + 1)], "--max-documents"),
        ([*SERVE, "--max-body-bytes", str(2**40)], "--max-body-bytes"),
        ([*SERVE, "--max-query-tokens", "1e3"], "--max-query-tokens"),
        ([*SERVE, "--max-request-tokens", str(10**12)], "--max-request-tokens"),
        ([*SERVE, "--body-timeout", "nan"], "--body-timeout"),
        ([*SERVE, "--body-timeout", "1e309"], "--body-timeout"),
        ([*SERVE, "--body-timeout", "86400"], "--body-timeout"),
        ([*SERVE, "--limit-concurrency", str(10**9)], "--limit-concurrency"),
        ([*SERVE, "--timeout-keep-alive", "inf"], "--timeout-keep-alive"),
        ([*SERVE, "--header-timeout", "-1"], "--header-timeout"),
        ([*SERVE, "--write-timeout", "0"], "--write-timeout"),
        ([*SERVE, "--shutdown-timeout", "inf"], "--shutdown-timeout"),
        ([*SERVE, "--batch-window-ms", "nan"], "--batch-window-ms"),
        ([*SERVE, "--batch-window-ms", "-1"], "--batch-window-ms"),
        ([*SERVE, "--batch-window-ms", "1e300"], "--batch-window-ms"),
        ([*SERVE, "--max-batch-documents", str(10**9)], "--max-batch-documents"),
        ([*SERVE, "--model-workers", "0"], "--model-workers"),
        ([*SERVE, "--model-workers", "1025"], "--model-workers"),
        ([*SERVE, "--host", ""], "--host"),
        ([*SERVE, "--model-name", "n" * 257], "--model-name"),
        ([*SERVE, "--device", "d" * 257], "--device"),
        (["serve", "--model", "m" * 4097], "--model"),
        (["rerank", "--query", "q", "--top-n", str(MAX_COUNT + 1)], "--top-n"),
        (["compare", "--query", "q", "--top-n", "9" * 5000], "--top-n"),
        (["demo", "--top-n", "inf"], "--top-n"),
    ],
)
def test_an_option_out_of_its_range_is_a_usage_error(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err
    assert len(err) < 2000  # a huge value is not echoed whole


def test_the_largest_values_in_range_are_accepted() -> None:
    args = _parser().parse_args(
        [*SERVE, "--port", "65535", "--batch-window-ms", "0", "--body-timeout", "3600"]
    )
    assert (args.port, args.batch_window_ms, args.body_timeout) == (65535, 0.0, 3600.0)
    assert _parser().parse_args([*SERVE, "--max-request-tokens", "none"]).max_request_tokens is None


def test_serve_refuses_a_port_out_of_range_before_loading_the_model() -> None:
    result = run_process([*SERVE, "--port", "70000"])
    assert result.returncode == 2, result.stderr
    assert "argument --port: must be a positive integer (at most 65535), got '70000'" in (
        result.stderr
    )
    assert "Could not load" not in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_a_port_in_use_before_loading_the_model() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run_process([*SERVE, "--port", str(port)])
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("memos-rerank:")]
    assert errors == [
        f"memos-rerank: error: Cannot listen on 127.0.0.1:{port}: Address already in use."
    ]
    assert "Could not load" not in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model-name", "tiny\x07model"], "holds a control or unprintable character"),
        (["--instruction", "x" * 8193], "--instruction is 8193 characters long; at most 8192"),
        (["--instruction", "caf\udce9"], "--instruction: character 4 is a lone surrogate"),
    ],
)
def test_serve_refuses_bad_text_options_before_loading_the_model(
    extra: list[str], message: str
) -> None:
    argv = [*SERVE, "--port", str(free_port()), *extra]
    result = subprocess.run(
        [sys.executable, "-m", "memos_rerank_integrations.cli", *(os.fsencode(a) for a in argv)],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("memos-rerank:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Could not load" not in result.stderr


# -- the query and the instruction of rerank and compare -----------------------------------


def test_a_query_over_the_limit_is_a_one_line_error(
    cross_encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--backend", "cross-encoder", "--model", str(cross_encoder_dir), *FP32]
    code, _, err = run_main(
        ["rerank", "--query", "q" * MAX_QUERY_LENGTH, *model], capsys, stdin=b"doc\n"
    )
    assert code == 0, err
    for command in ("rerank", "compare"):
        argv = [command, "--query", "q" * (MAX_QUERY_LENGTH + 1)]
        column = ["--backend", f"cross-encoder={cross_encoder_dir}"]
        argv += model if command == "rerank" else column
        err = one_line_error(*run_main(argv, capsys, stdin=b"doc\n"))
        assert f"--query is {MAX_QUERY_LENGTH + 1} characters long" in err


def test_an_instruction_over_the_limit_is_refused_before_any_input_is_read(
    qwen_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin = Stdin(b"User likes tea.\n")
    previous, sys.stdin = sys.stdin, stdin
    try:
        argv = ["rerank", "--query", "q", "--model", str(qwen_dir), "--instruction", "x" * 8193]
        code = main(argv)
    finally:
        sys.stdin = previous
    err = one_line_error(code, *capsys.readouterr())
    assert "--instruction is 8193 characters long; at most 8192 are accepted" in err
    assert stdin.consumed == 0


def test_errors_replace_applies_to_the_instruction(
    qwen_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["rerank", "--query", "q", "--model", str(qwen_dir), *FP32, "--instruction", "caf\udce9"]
    err = one_line_error(*run_main(argv, capsys, stdin=b"tea\n"))
    assert "--instruction: character 4 is a lone surrogate (U+DCE9)" in err
    code, out, err = run_main([*argv, "--errors", "replace"], capsys, stdin=b"tea\n")
    assert code == 0, err
    assert json.loads(out)["results"][0]["text"] == "tea"


# -- input: bounded, and reported as soon as a bound is passed -----------------------------


def test_a_line_over_the_limit_is_an_error_before_the_input_ends(tmp_path: Path) -> None:
    """Fed through a pipe that stays open: the command stops at the limit instead of
    waiting for the line's end (or the input's)."""
    argv = ["rerank", "--query", "q", "--backend", "cross-encoder", "--model", MISSING_MODEL]
    process = subprocess.Popen(
        [sys.executable, "-m", "memos_rerank_integrations.cli", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(),
    )
    assert process.stdin is not None
    chunk = b"x" * (1024 * 1024)

    def feed() -> None:
        try:
            for _ in range(MAX_LINE_BYTES // len(chunk) + 2):
                process.stdin.write(chunk)  # type: ignore[union-attr]
        except (BrokenPipeError, ValueError):
            pass  # the command stopped reading, as it should

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        code = process.wait(timeout=60)  # the pipe is still open: no end of input
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the command waited for the end of an over-long line") from None
    finally:
        writer.join(timeout=10)
        process.stdin.close()
    err = process.stderr.read().decode() if process.stderr else ""  # type: ignore[union-attr]
    assert code == 1, err
    assert err == (
        "memos-rerank: error: line 1 is longer than 16 MiB; a document may hold at most "
        f"{MAX_LINE_BYTES} bytes.\n"
    )


def test_a_line_of_exactly_the_limit_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_input, "MAX_LINE_BYTES", 10)
    stream = io.BytesIO(b"0123456789\r\n" + b"abcdefghij\n" + b"ABCDEFGHIJK\n")
    with pytest.raises(_input.UserError, match="line 3 is longer than 10 bytes"):
        list(_input._decoded_lines(stream, "strict"))
    stream.seek(0)
    lines = _input._decoded_lines(stream, "strict")
    assert [next(lines), next(lines)] == [(1, "0123456789"), (2, "abcdefghij")]


def test_input_over_the_total_limit_stops_at_the_limit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_input, "MAX_INPUT_BYTES", 1000)
    stdin = Stdin(b"a memory\n" * 10_000)
    previous, sys.stdin = sys.stdin, stdin
    try:
        code = main(["rerank", "--query", "q", "--backend", "cross-encoder", "--model", "unused"])
    finally:
        sys.stdin = previous
    err = one_line_error(code, *capsys.readouterr())
    assert "The input is larger than 1000 bytes (at line 112)" in err
    assert stdin.consumed <= 1000 + 9


def test_more_documents_than_the_limit_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["rerank", "--query", "q", "--backend", "cross-encoder", "--model", MISSING_MODEL]
    argv.append("--no-progress")
    blank_lines_are_free = b"\n\n" + b"m\n" * MAX_DOCUMENTS + b"\n"
    err = one_line_error(*run_main(argv, capsys, stdin=blank_lines_are_free + b"one more\n"))
    assert f"stdin holds more than {MAX_DOCUMENTS} documents (line {MAX_DOCUMENTS + 4})" in err
    # Exactly the limit is read (and then the missing model is the error).
    err = one_line_error(*run_main(argv, capsys, stdin=blank_lines_are_free))
    assert "Could not load model" in err


# -- JSON lines: the numbers and nesting of what is echoed back -----------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("NaN", "NaN is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
        ("1e400", "the number 1e400 is too large for a float"),
        ("-" + "9" * (MAX_INTEGER_DIGITS + 1), "an integer of 309 digits (at most 308)"),
        ("9" * 5000, "an integer of 5000 digits (at most 308)"),
    ],
)
def test_a_record_with_a_number_json_cannot_carry_is_a_one_line_error(
    value: str, message: str, cross_encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin = f'{{"text": "fine", "n": 1}}\n{{"text": "tea", "n": [{value}]}}\n'.encode()
    argv = ["rerank", "--query", "q", "--backend", "cross-encoder", "--model"]
    err = one_line_error(*run_main([*argv, str(cross_encoder_dir), *FP32], capsys, stdin=stdin))
    assert f"stdin line 2: {message}; numbers must be finite and fit a float." in err


def test_records_are_echoed_as_valid_json(
    cross_encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = int("9" * MAX_INTEGER_DIGITS)
    record = {"text": "tea", "n": [1.5e300, -big, 0.0], "deep": [[[[{"k": None}]]]]}
    argv = ["rerank", "--query", "q", "--backend", "cross-encoder", "--model"]
    code, out, err = run_main(
        [*argv, str(cross_encoder_dir), *FP32], capsys, stdin=json.dumps(record).encode()
    )
    assert code == 0, err

    def refuse(text: str) -> Any:
        raise AssertionError(f"{text} in the output")

    (result,) = json.loads(out, parse_constant=refuse)["results"]
    assert result["record"] == record


def test_compare_refuses_a_vector_score_no_float_holds(
    cross_encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was an OverflowError traceback: the score is turned into a float."""
    stdin = b'{"text": "tea", "score": 1' + b"0" * 400 + b"}\n"
    argv = ["compare", "--query", "q", "--backend", f"cross-encoder={cross_encoder_dir}"]
    err = one_line_error(*run_main(argv, capsys, stdin=stdin))
    assert "stdin line 1: an integer of 401 digits" in err


def nested(depth: int) -> bytes:
    """A record whose objects and arrays nest ``depth`` levels (the record is one)."""
    return b'{"text": "tea", "n": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}\n"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 100_000])
def test_a_record_nested_too_deeply_is_a_one_line_error(
    depth: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """900 levels parse, but cleaning and writing the record back recursed past
    Python's limit (a RecursionError traceback)."""
    argv = ["rerank", "--query", "q", "--backend", "cross-encoder", "--model", MISSING_MODEL]
    err = one_line_error(*run_main(argv, capsys, stdin=nested(depth)))
    assert f"stdin line 1: JSON nested more than {MAX_JSON_DEPTH} levels deep." in err


def test_a_record_nested_exactly_to_the_limit_is_read(
    cross_encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["rerank", "--query", "q", "--backend", "cross-encoder", "--model"]
    code, out, err = run_main(
        [*argv, str(cross_encoder_dir), *FP32], capsys, stdin=nested(MAX_JSON_DEPTH)
    )
    assert code == 0, err
    assert json.loads(out)["results"][0]["text"] == "tea"


# -- every way a command ends ----------------------------------------------------------------


def test_an_unexpected_error_is_one_line_not_a_traceback(
    cross_encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model on the meta device computes no values: torch raises while scoring."""
    argv = ["rerank", "--query", "q", "--backend", "cross-encoder", "--model"]
    code, out, err = run_main(
        [*argv, str(cross_encoder_dir), "--device", "meta"], capsys, stdin=b"tea\n"
    )
    assert (code, out) == (1, "")
    # Above it, only transformers' loading progress bar.
    *_, last = err.splitlines()
    assert last.startswith("memos-rerank: error: ") and "Error: " in last
    assert err.count("memos-rerank:") == 1 and "Traceback" not in err


FAKE_TORCH = """
import os, signal, time
# What an interrupted C extension does: numpy's import_array() (inside torch._C)
# replaces the pending KeyboardInterrupt with an ImportError.
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
except KeyboardInterrupt:
    raise ImportError("numpy.core.multiarray failed to import") from None
"""


def test_ctrl_c_while_torch_is_imported_is_interrupted(tmp_path: Path) -> None:
    """It was reported as a missing dependency ("install the local extra")."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(FAKE_TORCH)
    env = environment()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(SRC)])
    argv = ["rerank", "--query", "q", "--backend", "cross-encoder", "--model", "m"]
    result = run_process(argv, stdin=b"tea\n", env=env)
    assert (result.returncode, result.stderr) == (130, "memos-rerank: interrupted\n")
    assert result.stdout == ""


def test_ctrl_c_is_interrupted_and_the_handler_is_restored(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from memos_rerank_integrations.cli import _rerank

    def interrupted_import(*args: Any, **kwargs: Any) -> Any:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        except KeyboardInterrupt:
            raise ImportError("numpy.core.multiarray failed to import") from None
        raise AssertionError("no SIGINT arrived")

    monkeypatch.setattr(_rerank, "build_backend", interrupted_import)
    code, out, err = run_main(["rerank", "--query", "q"], capsys, stdin=b"tea\n")
    assert (code, out, err) == (130, "", "memos-rerank: interrupted\n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
