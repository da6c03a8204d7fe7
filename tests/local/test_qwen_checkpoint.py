"""QwenReranker's load from the checkpoint's files: the packed engine read straight from
config.json and safetensors, equal to the one built through transformers, for exactly
the checkpoints it covers; the tokenizer loading meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from memos_rerank_integrations import QwenReranker
from memos_rerank_integrations._engine import checkpoint as _checkpoint
from memos_rerank_integrations._engine import qwen3 as _qwen_engine
from memos_rerank_integrations._engine.checkpoint import open_qwen3
from memos_rerank_integrations._engine.linear import can_prepack
from memos_rerank_integrations._local import qwen as _qwen_module
from memos_rerank_integrations._local.runtime import clear_model_cache
from memos_rerank_integrations.testing import build_tiny_qwen_reranker

from ..support import qwen_fixtures as _qwen_fixtures
from ..support.qwen_fixtures import ModelCardRecipe, by_index

TOLERANCE = 1e-4
QUERY = "Where is the user going?"
DOCUMENTS = [
    "User is going on a business trip to Beijing next Wednesday. " * 6,
    "User likes tea.",
    "x",
    "User is going to Beijing.",
]

tiny_qwen_dir = _qwen_fixtures.tiny_qwen_dir

pytestmark = pytest.mark.skipif(
    not can_prepack(torch.ones(1)), reason="this torch has no oneDNN prepacked linear"
)


@pytest.fixture(autouse=True)
def _fresh_models() -> Iterator[None]:
    clear_model_cache()
    yield
    clear_model_cache()


def _copy(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def _edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


_DROP = object()


def _resave(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the checkpoint's tensors (``change`` edits the name -> tensor dict)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module", params=[False, True], ids=["no-bias", "qkv-bias"])
def shaped_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with RMSNorm weights spread around 1 and (or not) q/k/v/o biases."""
    path = build_tiny_qwen_reranker(
        tmp_path_factory.mktemp("tiny-qwen-files"), attention_bias=request.param
    )
    generator = torch.Generator().manual_seed(11)

    def spread(tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name.endswith("norm.weight"):
                tensors[name] = 1 + 0.5 * torch.randn(tensor.shape, generator=generator)
            elif name.endswith("bias"):
                tensors[name] = 0.05 * torch.randn(tensor.shape, generator=generator)

    _resave(path, spread)
    return path


def _through_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_qwen_module, "open_qwen3", lambda model: None)


@pytest.mark.parametrize("stacked", [False, True], ids=["separate-qkv", "stacked-qkv"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_read_from_the_files_equals_the_one_built_through_transformers(
    shaped_dir: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, stacked: bool
) -> None:
    """The files' engine (weights cast to the dtype as transformers casts them, norms
    folded, q/k rows in rotary order, q/k/v stacked or not) gives bit for bit the
    scores of the engine built on transformers' loaded model; in float32 both equal
    the recipe."""
    monkeypatch.setattr(_qwen_engine, "_amx_bf16", lambda kind: stacked)
    from_files = QwenReranker(shaped_dir, dtype=dtype, device="cpu", max_batch_tokens=64)
    scorer = from_files._loaded()
    assert scorer.decoder is None and scorer.engine is not None
    assert scorer.engine.stack_qkv == stacked
    got = by_index(from_files.rerank(QUERY, DOCUMENTS))
    clear_model_cache()
    with monkeypatch.context() as patch:
        _through_transformers(patch)
        loaded = QwenReranker(shaped_dir, dtype=dtype, device="cpu", max_batch_tokens=64)
        assert loaded._loaded().decoder is not None
        expected = by_index(loaded.rerank(QUERY, DOCUMENTS))
        assert torch.equal(loaded._loaded().head, scorer.head)
    assert got == expected
    if dtype == "float32":
        recipe = ModelCardRecipe(shaped_dir)(QUERY, DOCUMENTS)
        assert got == pytest.approx(recipe, abs=TOLERANCE)
        assert max(recipe) - min(recipe) > 0.02  # the scores tell documents apart


def test_an_untied_checkpoint_is_scored_with_its_own_output_head(tmp_path: Path) -> None:
    path = build_tiny_qwen_reranker(tmp_path / "untied", tie_word_embeddings=False)
    reranker = QwenReranker(path, dtype="float32", device="cpu")
    assert reranker._loaded().decoder is None
    recipe = ModelCardRecipe(path)
    expected = recipe(QUERY, DOCUMENTS)
    assert by_index(reranker.rerank(QUERY, DOCUMENTS)) == pytest.approx(expected, abs=TOLERANCE)
    # The head is the untied one (the embedding's rows would score otherwise).
    embedding = recipe.model.get_input_embeddings().weight
    yes, no = recipe.token_true_id, recipe.token_false_id
    assert not torch.allclose(reranker._loaded().head, embedding[yes] - embedding[no])


def test_a_sharded_checkpoint_is_read_from_its_files(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = _copy(tiny_qwen_dir, tmp_path / "sharded")
    (path / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    reranker = QwenReranker(path, dtype="float32", device="cpu")
    assert reranker._loaded().decoder is None
    expected = ModelCardRecipe(tiny_qwen_dir)(QUERY, DOCUMENTS)
    assert by_index(reranker.rerank(QUERY, DOCUMENTS)) == pytest.approx(expected, abs=TOLERANCE)


def _untie_head(tensors: dict[str, torch.Tensor]) -> None:
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1


def _extra_tensor(tensors: dict[str, torch.Tensor]) -> None:
    tensors["lm_head.bias"] = torch.zeros(len(tensors["model.embed_tokens.weight"]))


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].clone()


_NOT_COVERED: dict[str, dict[str, Any]] = {
    "another-model-type": {"model_type": "qwen2"},
    "another-architecture": {"architectures": ["Qwen3ForSequenceClassification"]},
    "gelu": {"hidden_act": "gelu"},
    "scaled-rope": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
    "another-rope-type": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6}},
    "rope-scaling-v4": {"rope_parameters": _DROP, "rope_theta": 1e6, "rope_scaling": {"factor": 2}},
    "sliding-window": {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
    "sliding-layer": {"layer_types": ["full_attention", "sliding_attention"]},
    "tie-unknown": {"tie_word_embeddings": _DROP},
    "eps-unknown": {"rms_norm_eps": _DROP},
    "quantized": {"quantization_config": {"quant_method": "bitsandbytes"}},
}
_NOT_COVERED_TENSORS = {
    "untied-head-in-a-tied-checkpoint": _untie_head,
    "an-extra-tensor": _extra_tensor,
    "a-wrong-shape": _wrong_shape,
}


@pytest.mark.parametrize("case", [*_NOT_COVERED, *_NOT_COVERED_TENSORS])
def test_only_checkpoints_the_engine_covers_are_read_from_their_files(
    tiny_qwen_dir: Path, tmp_path: Path, case: str
) -> None:
    """A setting the engine does not implement, one whose default transformers
    versions disagree on, or a tensor that is not a Qwen3ForCausalLM's: the files are
    not read (transformers loads the model)."""
    path = _copy(tiny_qwen_dir, tmp_path / case)
    checkpoint = open_qwen3(str(path))
    assert checkpoint is not None  # the unchanged copy is read
    checkpoint.close()
    if case in _NOT_COVERED:
        _edit_config(path, **_NOT_COVERED[case])
    else:
        _resave(path, _NOT_COVERED_TENSORS[case])
    assert open_qwen3(str(path)) is None


def test_a_transformers_4_config_is_read(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    """transformers 4.x writes ``rope_theta`` / ``rope_scaling: null`` and no
    ``layer_types``; such a config is read alike."""
    path = _copy(tiny_qwen_dir, tmp_path / "v4")
    config = json.loads((path / "config.json").read_text())
    theta = config["rope_parameters"]["rope_theta"]
    _edit_config(
        path, rope_parameters=_DROP, layer_types=_DROP, rope_theta=theta, rope_scaling=None
    )
    checkpoint = open_qwen3(str(path))
    assert checkpoint is not None
    with checkpoint:
        assert checkpoint.settings.rope_theta == theta
        assert checkpoint.settings.layers == config["num_hidden_layers"]


def test_a_model_the_files_do_not_cover_scores_like_the_recipe(
    tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    path = _copy(tiny_qwen_dir, tmp_path / "untied-head")
    _resave(path, _untie_head)
    reranker = QwenReranker(path, dtype="float32", device="cpu")
    assert reranker._loaded().decoder is not None
    expected = ModelCardRecipe(path)(QUERY, DOCUMENTS)
    assert by_index(reranker.rerank(QUERY, DOCUMENTS)) == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_default_rotary_embedding_equals_transformers(
    tiny_qwen_dir: Path, dtype: torch.dtype
) -> None:
    from transformers import AutoConfig
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = AutoConfig.from_pretrained(tiny_qwen_dir)
    checkpoint = open_qwen3(str(tiny_qwen_dir))
    assert checkpoint is not None
    checkpoint.close()
    ours = _checkpoint.DefaultRotary(_checkpoint.default_inv_freq(checkpoint.settings))
    theirs = Qwen3RotaryEmbedding(config)
    positions = torch.arange(config.max_position_embeddings)[None]
    x = torch.zeros(1, dtype=dtype)
    for got, expected in zip(ours(x, positions), theirs(x, positions), strict=True):
        assert got.dtype == expected.dtype == dtype
        assert torch.equal(got, expected)


def test_the_tokenizer_loads_before_the_weights_in_the_calling_thread(
    tiny_qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call is tokenized (and an instruction that cannot fit is refused) before
    the weights load; a thread for the tokenizer would only contend with torch's."""
    order: list[tuple[str, threading.Thread]] = []
    load_tokens, engine = _qwen_module._load_tokens, _qwen_module.checkpoint_engine

    def tokens(model: str) -> Any:
        order.append(("tokens", threading.current_thread()))
        return load_tokens(model)

    def weights(*args: Any) -> Any:
        order.append(("weights", threading.current_thread()))
        return engine(*args)

    monkeypatch.setattr(_qwen_module, "_load_tokens", tokens)
    monkeypatch.setattr(_qwen_module, "checkpoint_engine", weights)
    assert QwenReranker(tiny_qwen_dir, dtype="float32", device="cpu").rerank("q", ["a memory"])
    caller = threading.current_thread()
    assert order == [("tokens", caller), ("weights", caller)]


def test_a_tokenizer_that_fails_to_load_fails_the_model_load(
    tiny_qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memos_rerank_integrations import ModelLoadError

    def broken(model: str) -> Any:
        raise OSError("no tokenizer here")

    monkeypatch.setattr(_qwen_module, "_load_tokens", broken)
    with pytest.raises(ModelLoadError, match="no tokenizer here"):
        QwenReranker(tiny_qwen_dir, dtype="float32", device="cpu").rerank("q", ["d"])


_CHILD = """
import sys
from memos_rerank_integrations import QwenReranker
reranker = QwenReranker(sys.argv[1], dtype=sys.argv[2], device="cpu")
print(reranker.rerank("What does the user like?", ["User likes tea."])[0].score)
print(sorted(name for name in sys.modules if name.split(".")[0] == "transformers"))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scoring_from_the_files_never_imports_transformers(tiny_qwen_dir: Path, dtype: str) -> None:
    """Tokenizer and weights both read from their files: a first score does not pay
    for importing transformers (over a second)."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tiny_qwen_dir), dtype],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    score, modules = done.stdout.strip().splitlines()[-2:]
    assert 0.0 <= float(score) <= 1.0
    assert modules == "[]", modules


def _child(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True
    ).stdout


def test_making_a_reranker_does_not_import_transformers() -> None:
    """Whether transformers is installed is checked without importing it (the import
    takes a while and a model read from its files does not need it)."""
    out = _child(
        "import sys\nfrom memos_rerank_integrations import QwenReranker\n"
        "QwenReranker('some/model')\nprint('transformers' in sys.modules)"
    )
    assert out.strip() == "False"


def test_without_transformers_a_reranker_names_the_extra_to_install() -> None:
    out = _child(
        "import sys\nsys.modules['transformers'] = None\n"
        "from memos_rerank_integrations import QwenReranker\n"
        "try:\n    QwenReranker('some/model')\nexcept ImportError as e:\n    print(e)"
    )
    assert "memos-rerank-integrations[local]" in out and "transformers" in out


def _resident_kib(path: Path) -> tuple[int, int]:
    """This process's mappings of ``path``: how many, and their resident KiB."""
    mappings = resident = 0
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(path)
            mappings += inside
        elif inside and fields[:1] == ["Rss:"]:
            resident += int(fields[1])
    return mappings, resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_embedding_stays_mapped_and_holds_only_rows_read(tmp_path: Path, dtype: str) -> None:
    """The embedding (stored in float32) is not copied, in its own dtype or another:
    it stays memory-mapped, through a mapping of its own, so the pages of the layers'
    weights read while loading are not kept resident with it; in another dtype, the
    rows looked up are cast (the scores are transformers', see
    ``test_the_engine_read_from_the_files_equals_the_one_built_through_transformers``)."""
    path = build_tiny_qwen_reranker(
        tmp_path / "wide", hidden_size=256, intermediate_size=1024, head_dim=64
    )
    weights = (path / "model.safetensors").resolve()
    reranker = QwenReranker(path, dtype=dtype, device="cpu")
    assert reranker.rerank("q", ["a memory"])
    engine = reranker._loaded().engine
    assert engine is not None
    mappings, resident = _resident_kib(weights)
    assert mappings == 1  # the embedding's own (the layers' weights were copied)
    assert resident * 1024 < weights.stat().st_size / 4, resident
    embed = engine.embed_tokens
    table = (embed if dtype == "float32" else embed.table).weight
    assert table.dtype == torch.float32
    mapped = [
        line for line in Path("/proc/self/maps").read_text().splitlines() if str(weights) in line
    ]
    start, end = (int(part, 16) for part in mapped[0].split()[0].split("-"))
    assert start <= table.data_ptr() < end
