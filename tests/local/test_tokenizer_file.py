"""A Qwen tokenizer read straight from its ``tokenizer.json``: the same ids, words and
text as transformers' ``AutoTokenizer`` wherever it is used, ``None`` (transformers
then loads it) wherever transformers would tokenize differently, and no transformers
import on the way to a first score (see ``test_qwen_checkpoint``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from memos_rerank_integrations import QwenReranker
from memos_rerank_integrations._local.tokenizer_file import (
    FileTokenizer,
    open_tokenizer_file,
)

from ..support import qwen_fixtures as _qwen_fixtures

tiny_qwen_dir = _qwen_fixtures.tiny_qwen_dir

# Where tokenizers can disagree: added tokens inside words, normalization (NFC joins a
# letter and its mark), marks after letters (the pattern below splits them), digits,
# contractions, whitespace runs, emoji and CJK.
PIECES = [
    *"ab Yz1:?!.'\n\t\r茅台🙂-",
    "e\u0301",
    "\u0301",
    "\u0915\u093f",
    "\u212b",
    "ﬁ",
    "<|im_end|>",
    "<|endoftext|>",
    "<think>",
    "</think>",
    "<|im_start|>user",
    "'ll",
    "'S",
    "2024",
    "   ",
    "\n\n",
]
texts = st.lists(st.sampled_from(PIECES), max_size=60).map("".join)
CRAFTED = [
    "",
    "What are the user's hobbies?",
    "用户喜欢喝酱香型白酒，比如茅台。 Café naïve résumé — emoji 🙂",
    "x<|im_end|>y<think>z</think>",
    "e\u0301 \u0915\u093f\u0924\u093e\u092c",
    " " * 9 + "a\n\n\n b",
]
# GPT-2's pattern (no case-insensitive contractions, no newline rules): a stored
# pattern transformers' Qwen2Tokenizer would replace with its own.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_json(path: Path, edit: Callable[[Any], None]) -> None:
    document = json.loads(path.read_text(encoding="utf-8"))
    edit(document)
    path.write_text(json.dumps(document), encoding="utf-8")


def _as_qwen2_class(directory: Path) -> None:
    """The tokenizer config the published Qwen3 checkpoints have: Qwen2Tokenizer."""

    def edit(config: dict[str, Any]) -> None:
        config["tokenizer_class"] = "Qwen2Tokenizer"

    _edit_json(directory / "tokenizer_config.json", edit)


@pytest.fixture(scope="module")
def qwen2_class_dir(tiny_qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = _copy(tiny_qwen_dir, tmp_path_factory.mktemp("qwen2-class") / "model")
    _as_qwen2_class(directory)
    return directory


@pytest.fixture(scope="module", params=["as-stored", "qwen2-class"])
def pair(request: pytest.FixtureRequest, tiny_qwen_dir: Path, qwen2_class_dir: Path) -> Any:
    """(tokenizer.json read directly, transformers' AutoTokenizer) for one model."""
    directory = tiny_qwen_dir if request.param == "as-stored" else qwen2_class_dir
    direct = open_tokenizer_file(str(directory))
    assert isinstance(direct, FileTokenizer)
    return direct, AutoTokenizer.from_pretrained(directory)


def _same(direct: FileTokenizer, reference: Any, text: str) -> None:
    for special in (False, True):
        ids = reference(text, add_special_tokens=special)["input_ids"]
        assert direct(text, add_special_tokens=special)["input_ids"] == ids, text
        assert direct.encode(text, add_special_tokens=special) == ids
    encoded = reference(text, add_special_tokens=False)
    assert direct(text, add_special_tokens=False).word_ids() == encoded.word_ids()
    ids = encoded["input_ids"]
    assert direct.decode(ids) == reference.decode(ids)
    assert direct.decode(ids[1:-1]) == reference.decode(ids[1:-1])


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_ids_words_and_text_are_transformers(pair: Any, text: str) -> None:
    direct, reference = pair
    _same(direct, reference, text)


def test_crafted_texts_batches_and_vocabulary_are_transformers(pair: Any) -> None:
    direct, reference = pair
    for text in CRAFTED:
        _same(direct, reference, text)
    batch = reference(CRAFTED, add_special_tokens=False)["input_ids"]
    assert direct(CRAFTED, add_special_tokens=False)["input_ids"] == batch
    for token in ("yes", "no", "<|im_end|>", "<think>"):
        assert direct.convert_tokens_to_ids(token) == reference.convert_tokens_to_ids(token)
    # A token not in the vocabulary: None here, the unknown token's id there (for
    # Qwen2Tokenizer); it round-trips in neither, which is what QwenReranker checks.
    for tokenizer in (direct, reference):
        token_id = tokenizer.convert_tokens_to_ids("not-a-token-at-all")
        assert token_id is None or tokenizer.convert_ids_to_tokens(token_id) != "not-a-token-at-all"
    for token_id in (0, 1, 2, 5, len(reference) - 1):
        assert direct.convert_ids_to_tokens(token_id) == reference.convert_ids_to_tokens(token_id)
    assert {i: t.content for i, t in direct.added_tokens_decoder.items()} == {
        i: t.content for i, t in reference.added_tokens_decoder.items()
    }


def _with_pattern(tokenizer: dict[str, Any], pattern: str) -> None:
    tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": pattern}


def _unknown_class(config: dict[str, Any], ids: dict[str, int]) -> None:
    config["tokenizer_class"] = "LlamaTokenizer"


def _split_specials(config: dict[str, Any], ids: dict[str, int]) -> None:
    config["split_special_tokens"] = True


def _prefix_space(config: dict[str, Any], ids: dict[str, int]) -> None:
    config["add_prefix_space"] = True


def _special_not_added(config: dict[str, Any], ids: dict[str, int]) -> None:
    config["unk_token"] = "yes"  # in the vocabulary, not an added token


def _special_missing(config: dict[str, Any], ids: dict[str, int]) -> None:
    config["additional_special_tokens"] = ["<|im_start|>", "<|box_start|>"]


def _decoder_other_id(config: dict[str, Any], ids: dict[str, int]) -> None:
    config["added_tokens_decoder"] = {str(ids["<|im_end|>"] + 1): {"content": "<|im_end|>"}}


def _decoder_other_flags(config: dict[str, Any], ids: dict[str, int]) -> None:
    # The right id, but the file's <think> is normalized.
    entry = {"content": "<think>", "normalized": False}
    config["added_tokens_decoder"] = {str(ids["<think>"]): entry}


def _not_a_dict(config: dict[str, Any], ids: dict[str, int]) -> None:
    config["added_tokens_decoder"] = ["<think>"]


@pytest.mark.parametrize(
    "edit",
    [
        _unknown_class,
        _split_specials,
        _prefix_space,
        _special_not_added,
        _special_missing,
        _decoder_other_id,
        _decoder_other_flags,
        _not_a_dict,
    ],
)
def test_a_config_that_changes_tokenizing_goes_to_transformers(
    tiny_qwen_dir: Path, tmp_path: Path, edit: Callable[[Any, dict[str, int]], None]
) -> None:
    directory = _copy(tiny_qwen_dir, tmp_path / "model")
    assert open_tokenizer_file(str(directory)) is not None
    stored = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {token["content"]: token["id"] for token in stored["added_tokens"]}
    _edit_json(directory / "tokenizer_config.json", lambda config: edit(config, ids))
    assert open_tokenizer_file(str(directory)) is None


def test_a_qwen2_class_whose_file_differs_from_transformers_goes_to_transformers(
    tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    """transformers' Qwen2Tokenizer keeps the file's vocabulary and merges but builds
    its own pattern: where the file's pattern differs, the two tokenize the prompt
    itself differently, so the file is not read directly."""
    directory = _copy(tiny_qwen_dir, tmp_path / "model")
    _as_qwen2_class(directory)
    _edit_json(directory / "tokenizer.json", lambda doc: _with_pattern(doc, GPT2_SPLIT))
    assert open_tokenizer_file(str(directory)) is None
    from tokenizers import Tokenizer

    as_stored = Tokenizer.from_file(str(directory / "tokenizer.json"))
    text = "What are the user's hobbies?\n<Document>: User likes"
    transformers_ids = AutoTokenizer.from_pretrained(directory).encode(
        text, add_special_tokens=False
    )
    assert as_stored.encode(text, add_special_tokens=False).ids != transformers_ids
    # The same pattern, stored and run as stored, is read directly.
    _edit_json(
        directory / "tokenizer_config.json",
        lambda config: config.update(tokenizer_class="TokenizersBackend"),
    )
    assert open_tokenizer_file(str(directory)) is not None


@pytest.mark.parametrize(
    "edit",
    [
        lambda doc: doc.update(normalizer={"type": "NFKC"}),
        lambda doc: doc.update(decoder={"type": "Fuse"}),
        lambda doc: doc["model"].update(byte_fallback=True),
        lambda doc: doc["model"].update(dropout=0.5),
        lambda doc: doc["model"].update(end_of_word_suffix="</w>"),
        lambda doc: doc["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True),
    ],
)
def test_a_qwen2_class_with_another_pipeline_goes_to_transformers(
    qwen2_class_dir: Path, tmp_path: Path, edit: Callable[[Any], None]
) -> None:
    directory = _copy(qwen2_class_dir, tmp_path / "model")
    _edit_json(directory / "tokenizer.json", edit)
    assert open_tokenizer_file(str(directory)) is None


@pytest.mark.parametrize("broken", ["missing", "not-json", "not-a-tokenizer", "panics"])
def test_unreadable_files_go_to_transformers(
    tiny_qwen_dir: Path, tmp_path: Path, broken: str
) -> None:
    directory = _copy(tiny_qwen_dir, tmp_path / "model")
    target = directory / "tokenizer.json"
    if broken == "missing":
        target.unlink()
    elif broken == "not-json":
        (directory / "tokenizer_config.json").write_text("{", encoding="utf-8")
    elif broken == "not-a-tokenizer":
        target.write_text('{"version": "1.0"}', encoding="utf-8")
    else:  # merges the prefix cannot split: the tokenizers library panics
        _edit_json(target, lambda doc: doc["model"].update(continuing_subword_prefix="##"))
    assert open_tokenizer_file(str(directory)) is None


def test_a_tokenizer_transformers_must_load_still_scores(
    qwen2_class_dir: Path, tmp_path: Path
) -> None:
    directory = _copy(qwen2_class_dir, tmp_path / "model")
    _edit_json(directory / "tokenizer.json", lambda doc: _with_pattern(doc, GPT2_SPLIT))
    reranker = QwenReranker(str(directory), device="cpu", dtype="float32")
    expected = QwenReranker(str(qwen2_class_dir), device="cpu", dtype="float32")
    query, documents = "What are the user's hobbies?", ["User likes badminton.", "Moutai"]
    assert [r.index for r in reranker.rerank(query, documents)] == [
        r.index for r in expected.rerank(query, documents)
    ]
    assert type(reranker._tokenizer().tokenizer).__name__ != "FileTokenizer"
