"""embedder.infer.tokenize: ids exactly as the model's own tokenizer gives them, truncated, unpadded, prompted."""

from __future__ import annotations

import numpy as np
import pytest
from models import LONG_TEXT, TEXTS
from tokenizers import Tokenizer

from embedder.errors import UsageError
from embedder.infer.tokenize import TextTokenizer, resolve_prompt
from embedder.model.spec import default_model_path

DEFAULT_MAX = 256
NON_LATIN = [t for t in TEXTS if any(ord(c) > 0x400 for c in t)]


@pytest.fixture(scope="module")
def default_tokenizer_file():
    """The shipped model's tokenizer.json, which pads every row to 128 and truncates at 128 by itself."""
    return default_model_path() / "tokenizer.json"


def rows(window) -> list[list[int]]:
    return [window.ids[a:b].tolist() for a, b in zip(window.offsets[:-1], window.offsets[1:])]


def test_ids_equal_the_models_own_tokenizer(default_tokenizer_file):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(default_model_path()))
    want = reference(TEXTS, truncation=True, max_length=DEFAULT_MAX)["input_ids"]
    assert rows(TextTokenizer(default_tokenizer_file, DEFAULT_MAX).encode(TEXTS)) == want


def test_tokenizer_files_own_padding_and_truncation_are_overridden(default_tokenizer_file):
    raw = Tokenizer.from_file(str(default_tokenizer_file))
    assert len(raw.encode("A").ids) == 128 and len(raw.encode(LONG_TEXT).ids) == 128  # the file's own settings
    window = TextTokenizer(default_tokenizer_file, DEFAULT_MAX).encode(["A", LONG_TEXT])
    assert window.lengths.tolist() == [3, DEFAULT_MAX]


def test_long_text_is_truncated_keeping_the_closing_special_token(default_tokenizer_file):
    window = TextTokenizer(default_tokenizer_file, 16).encode(["short", LONG_TEXT, "also short"])
    assert window.lengths.tolist()[1] == 16 and window.truncated == 1
    first, long_row, _ = rows(window)
    assert long_row[0] == first[0] and long_row[-1] == first[-1]  # [CLS] ... [SEP]


def test_window_layout_is_flat_ids_with_offsets(default_tokenizer_file):
    window = TextTokenizer(default_tokenizer_file, DEFAULT_MAX).encode(TEXTS)
    assert window.ids.dtype == window.offsets.dtype == np.int64
    assert window.offsets[0] == 0 and window.offsets[-1] == window.ids.size == window.lengths.sum()
    assert len(window.lengths) == len(TEXTS) and (window.lengths >= 2).all()  # the empty text is [CLS] [SEP]


def test_empty_window(default_tokenizer_file):
    window = TextTokenizer(default_tokenizer_file, DEFAULT_MAX).encode([])
    assert window.ids.size == 0 and window.offsets.tolist() == [0] and window.truncated == 0


def test_prompt_is_prepended_before_tokenizing(default_tokenizer_file):
    prompted = TextTokenizer(default_tokenizer_file, DEFAULT_MAX, prompt="query: ").encode(["what is a vector", ""])
    literal = TextTokenizer(default_tokenizer_file, DEFAULT_MAX).encode(["query: what is a vector", "query: "])
    assert rows(prompted) == rows(literal)


@pytest.mark.parametrize(
    "prompt, expected",
    [(None, "query: "), ("document", "passage: "), ("Represent this: ", "Represent this: ")],
)
def test_resolve_prompt_names_defaults_and_literals(prompt, expected):
    prompts = {"query": "query: ", "document": "passage: "}
    assert resolve_prompt(prompt, prompts, "query") == expected


def test_resolve_prompt_without_default_is_empty_and_a_bad_default_is_an_error():
    assert resolve_prompt(None, {"query": "query: "}, None) == ""
    with pytest.raises(UsageError, match="'missing' is not among its prompts"):
        resolve_prompt(None, {"query": "query: "}, "missing")


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "xlmr"])
def test_tiny_model_tokenizers_cover_the_non_latin_test_texts(model_zoo, family):
    """A guard on tests/models.py: the end-to-end texts reach the model as real tokens, not [UNK]."""
    path = model_zoo.path(family) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    unknown = {tokenizer.token_to_id(t) for t in ("[UNK]", "<unk>")} - {None}
    for ids in rows(TextTokenizer(path, 512).encode(NON_LATIN)):
        content = ids[1:-1]
        assert len(content) >= 3 and sum(i in unknown for i in content) <= len(content) // 4, ids
