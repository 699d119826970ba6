"""embedder.model.spec: reading a model's sentence-transformers pipeline, and resolving where the model is.

Most folders here hold only the JSON that load_spec reads; sentence-transformers' own Pooling class
is the oracle for how each pooling config form must be read.
"""

from __future__ import annotations

import json
import logging

import pytest
from models import (
    HIDDEN,
    MAX_SEQ_LENGTH,
    PLAIN_MAX_POSITIONS,
    fake_hub_snapshot,
    module_entry,
    update_json,
    write_json,
    write_spec_folder,
)

from embedder.errors import EXIT_USAGE, ModelNotFoundError, UnsupportedModelError
from embedder.model.spec import DenseSpec, Pooling, load_spec, parse_pooling, resolve_model_path
from jobs.export import main as export_main

LEGACY_ALL_FALSE = {
    "word_embedding_dimension": HIDDEN,
    "pooling_mode_cls_token": False,
    "pooling_mode_mean_tokens": False,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
}


def legacy_config(**modes: bool) -> dict:
    """A 1_Pooling/config.json as sentence-transformers < 5 wrote it (boolean keys)."""
    return {**LEGACY_ALL_FALSE, **{f"pooling_mode_{name}": value for name, value in modes.items()}}


def dense_config(in_features: int, out_features: int, activation: str = "torch.nn.modules.activation.Tanh") -> dict:
    return {"in_features": in_features, "out_features": out_features, "bias": True, "activation_function": activation}


def st_pooling_modes(folder) -> tuple[str, ...]:
    """How sentence-transformers itself reads a Pooling folder: its modes, in concatenation order."""
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    module = STPooling.load(str(folder))
    mode = module.pooling_mode
    return (mode,) if isinstance(mode, str) else tuple(mode)


def run_export_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """jobs.export main in-process: (exit code, stdout, stderr of this call only)."""
    capsys.readouterr()
    code = export_main([*argv, "--log-level", "ERROR"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    """The command line reports an error as exactly one line naming the problem, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("jobs.export: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# ---------------------------------------------------------------------------------------------
# Pooling config forms


POOLING_CONFIGS = {
    "legacy mean": (legacy_config(mean_tokens=True), (Pooling.MEAN,)),
    "legacy cls": (legacy_config(cls_token=True), (Pooling.CLS,)),
    "legacy nothing set means mean": (LEGACY_ALL_FALSE, (Pooling.MEAN,)),
    "legacy mean+cls in sentence-transformers' order": (
        legacy_config(mean_tokens=True, cls_token=True, max_tokens=True),
        (Pooling.CLS, Pooling.MAX, Pooling.MEAN),
    ),
    "legacy weightedmean and lasttoken": (
        legacy_config(weightedmean_tokens=True, lasttoken=True),
        (Pooling.WEIGHTED_MEAN, Pooling.LAST_TOKEN),
    ),
    "pooling_mode string": ({"embedding_dimension": HIDDEN, "pooling_mode": "max"}, (Pooling.MAX,)),
    "pooling_mode list keeps its order": (
        {"embedding_dimension": HIDDEN, "pooling_mode": ["mean", "cls"], "include_prompt": True},
        (Pooling.MEAN, Pooling.CLS),
    ),
    "pooling_mode sqrt-len": (
        {"embedding_dimension": HIDDEN, "pooling_mode": "mean_sqrt_len_tokens"},
        (Pooling.MEAN_SQRT_LEN,),
    ),
}


@pytest.mark.parametrize("config, expected", POOLING_CONFIGS.values(), ids=POOLING_CONFIGS.keys())
def test_pooling_config_forms_parse_as_sentence_transformers_reads_them(tmp_path, config, expected):
    root = write_spec_folder(tmp_path / "model", pooling_config=config, normalize=False)
    spec = load_spec(str(root))
    assert spec.pooling == expected
    assert tuple(p.value for p in spec.pooling) == st_pooling_modes(root / "1_Pooling")
    assert spec.dim == len(expected) * HIDDEN


@pytest.mark.parametrize(
    "value, expected",
    [
        ("mean", (Pooling.MEAN,)),
        ("cls+max", (Pooling.CLS, Pooling.MAX)),
        (" mean + cls ", (Pooling.MEAN, Pooling.CLS)),
        (["lasttoken"], (Pooling.LAST_TOKEN,)),
        ("pooler", (Pooling.POOLER,)),
    ],
)
def test_parse_pooling_cli_strings_and_lists(value, expected):
    assert parse_pooling(value) == expected


@pytest.mark.parametrize("value", ["avg", "mean+median", ["cls", "first"], {"pooling_mode": "sum"}])
def test_unknown_pooling_is_unsupported_and_lists_valid_modes(value):
    with pytest.raises(UnsupportedModelError, match="unknown pooling.*valid: cls, mean, max") as info:
        parse_pooling(value)
    assert info.value.exit_code == EXIT_USAGE


def test_multiple_modes_concatenate_into_one_vector_of_modes_times_hidden(tmp_path):
    config = {"embedding_dimension": HIDDEN, "pooling_mode": ["cls", "mean", "max"]}
    root = write_spec_folder(tmp_path / "model", pooling_config=config, dense=[dense_config(3 * HIDDEN, 8)])
    spec = load_spec(str(root))
    assert spec.pooling == (Pooling.CLS, Pooling.MEAN, Pooling.MAX)
    assert spec.dense[0].in_features == 3 * HIDDEN
    assert spec.dim == 8
    assert load_spec(str(write_spec_folder(tmp_path / "bare", pooling_config=config))).dim == 3 * HIDDEN


def test_pooling_override_must_fit_the_first_dense_layer(tmp_path):
    root = write_spec_folder(
        tmp_path / "model", pooling_config={"pooling_mode": "cls"}, dense=[dense_config(HIDDEN, 16)]
    )
    assert load_spec(str(root), (Pooling.MEAN,)).pooling == (Pooling.MEAN,)
    with pytest.raises(UnsupportedModelError, match="cls\\+mean gives 64 values.*expects 32"):
        load_spec(str(root), (Pooling.CLS, Pooling.MEAN))


# ---------------------------------------------------------------------------------------------
# Dense, Normalize, sequence length, prompts


def test_dense_chain_and_normalize_are_read_in_order(tmp_path):
    dense = [
        dense_config(HIDDEN, 24, "torch.nn.modules.activation.ReLU"),
        {**dense_config(24, 8, "torch.nn.modules.linear.Identity"), "bias": False},
    ]
    root = write_spec_folder(tmp_path / "model", pooling_config={"pooling_mode": "mean"}, dense=dense)
    spec = load_spec(str(root))
    assert spec.dense == (
        DenseSpec(root / "2_Dense", HIDDEN, 24, True, "relu"),
        DenseSpec(root / "3_Dense", 24, 8, False, "identity"),
    )
    assert spec.has_normalize and spec.dim == 8


def test_dense_with_an_unknown_activation_is_unsupported(tmp_path):
    dense = [dense_config(HIDDEN, 8, "my_package.Swish")]
    root = write_spec_folder(tmp_path / "model", pooling_config={"pooling_mode": "mean"}, dense=dense)
    with pytest.raises(UnsupportedModelError, match="my_package.Swish"):
        load_spec(str(root))


@pytest.mark.parametrize(
    "sentence_bert, tokenizer_max, positions, expected",
    [
        ({"max_seq_length": 24}, 512, 64, 24),  # configured length wins, as in sentence-transformers
        ({}, 48, 64, 48),  # else the tokenizer's limit ...
        ({}, 512, 64, 64),  # ... capped by the position embeddings
        ({}, None, 40, 40),  # no tokenizer limit: the positions
        ({}, 10**30, 40, 40),  # transformers' "no limit" sentinel is ignored
    ],
)
def test_max_seq_length_follows_sentence_transformers_rule(tmp_path, sentence_bert, tokenizer_max, positions, expected):
    root = write_spec_folder(tmp_path / "m", pooling_config={"pooling_mode": "mean"}, max_position_embeddings=positions)
    write_json(root / "sentence_bert_config.json", sentence_bert)
    if tokenizer_max is not None:
        write_json(root / "tokenizer_config.json", {"model_max_length": tokenizer_max})
    assert load_spec(str(root)).max_seq_length == expected


def test_no_known_sequence_length_is_unsupported(tmp_path):
    root = write_spec_folder(tmp_path / "m", pooling_config={"pooling_mode": "mean"})
    update_json(root / "config.json", max_position_embeddings=None)
    with pytest.raises(UnsupportedModelError, match="maximum sequence length"):
        load_spec(str(root))


def test_lowercasing_prompts_and_include_prompt_are_read(tmp_path):
    root = write_spec_folder(
        tmp_path / "m", pooling_config={"pooling_mode": "mean", "include_prompt": False}, normalize=False
    )
    write_json(root / "sentence_bert_config.json", {"max_seq_length": 20, "do_lower_case": True})
    prompts = {"query": "query: ", "document": "passage: "}
    write_json(root / "config_sentence_transformers.json", {"prompts": prompts, "default_prompt_name": None})
    spec = load_spec(str(root))
    assert (spec.do_lower_case, spec.include_prompt, spec.has_normalize) == (True, False, False)
    assert spec.prompts == prompts and spec.default_prompt_name is None


def test_default_prompt_left_out_of_pooling_is_refused(tmp_path):
    """The graph cannot tell where a prompt ends, so it cannot pool without it."""
    root = write_spec_folder(tmp_path / "m", pooling_config={"pooling_mode": "mean", "include_prompt": False})
    write_json(root / "config_sentence_transformers.json", {"prompts": {"query": "q: "}, "default_prompt_name": "query"})
    with pytest.raises(UnsupportedModelError, match="include_prompt false"):
        load_spec(str(root))


def test_content_hash_covers_weights_and_configs_but_not_docs_or_onnx(tmp_path):
    root = write_spec_folder(tmp_path / "m", pooling_config={"pooling_mode": "mean"})
    (root / "model.safetensors").write_bytes(b"weights-1")
    spec = load_spec(str(root))
    before = spec.content_hash()
    (root / "README.md").write_text("docs do not shape the graph")
    write_json(root / "onnx" / "model.onnx", {})
    assert spec.content_hash() == before
    (root / "model.safetensors").write_bytes(b"weights-2")
    after_weights = spec.content_hash()
    assert after_weights != before
    update_json(root / "1_Pooling" / "config.json", pooling_mode="cls")
    assert spec.content_hash() != after_weights


def test_plain_checkpoint_warns_and_uses_mean_pooling(model_zoo, caplog):
    path = model_zoo.path("plain_bert")
    with caplog.at_level(logging.WARNING, logger="embedder.model.spec"):
        spec = load_spec(str(path))
    assert spec.pooling == (Pooling.MEAN,)
    assert not spec.sentence_transformers_config and not spec.has_normalize and not spec.dense
    assert spec.max_seq_length == PLAIN_MAX_POSITIONS
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "modules.json" in warnings[0].getMessage()
    assert "mean pooling" in warnings[0].getMessage()


def test_sentence_transformers_save_is_read_without_warning(model_zoo, caplog):
    with caplog.at_level(logging.WARNING, logger="embedder.model.spec"):
        spec = load_spec(str(model_zoo.path("bert")))
    assert not caplog.records
    assert spec.pooling == (Pooling.CLS,)
    assert [(d.in_features, d.out_features, d.activation) for d in spec.dense] == [(HIDDEN, 16, "tanh")]
    assert spec.has_normalize and spec.dim == 16 and spec.max_seq_length == MAX_SEQ_LENGTH


# ---------------------------------------------------------------------------------------------
# Pipelines the exporter cannot reproduce


UNSUPPORTED_PIPELINES = {
    "LayerNorm after pooling": ["LayerNorm"],
    "WordEmbeddings after pooling": ["WordEmbeddings"],
}


@pytest.mark.parametrize("extra", UNSUPPORTED_PIPELINES.values(), ids=UNSUPPORTED_PIPELINES.keys())
def test_unsupported_module_is_a_clear_usage_error(tmp_path, capsys, extra):
    root = write_spec_folder(tmp_path / "m", pooling_config={"pooling_mode": "mean"}, extra_modules=extra)
    with pytest.raises(UnsupportedModelError, match=f"module 2 of .*modules.json is .*{extra[0]}") as info:
        load_spec(str(root))
    assert info.value.exit_code == EXIT_USAGE
    code, out, err = run_export_cli(["--model", str(root), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert (code, out) == (EXIT_USAGE, "")
    assert_one_error_line(err, extra[0], "Transformer, then Pooling, then Dense layers, then Normalize")


def test_word_embeddings_in_place_of_the_transformer_is_unsupported(tmp_path):
    root = write_spec_folder(tmp_path / "m", pooling_config={"pooling_mode": "mean"})
    write_json(root / "modules.json", [module_entry(0, "WordEmbeddings", "0_WordEmbeddings"),
                                       module_entry(1, "Pooling", "1_Pooling")])
    with pytest.raises(UnsupportedModelError, match="module 0 .*WordEmbeddings"):
        load_spec(str(root))


@pytest.mark.parametrize(
    "modules",
    [
        [module_entry(0, "Transformer", "")],
        [module_entry(0, "Transformer", ""), module_entry(1, "Dense", "1_Dense"), module_entry(2, "Pooling", "2_P")],
    ],
    ids=["no pooling", "dense before pooling"],
)
def test_pipeline_without_pooling_right_after_transformer_is_unsupported(tmp_path, modules):
    root = write_spec_folder(tmp_path / "m", pooling_config={"pooling_mode": "mean"})
    write_json(root / "1_Dense" / "config.json", dense_config(HIDDEN, 8))
    write_json(root / "modules.json", modules)
    with pytest.raises(UnsupportedModelError):
        load_spec(str(root))


# ---------------------------------------------------------------------------------------------
# Finding the model: local folders and the local Hugging Face cache


def test_missing_model_says_where_it_looked(tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(ModelNotFoundError) as info:
        load_spec("acme/no-such-model")
    message = str(info.value)
    assert str(hub) in message and "models--acme--no-such-model" in message
    assert info.value.exit_code == EXIT_USAGE
    with pytest.raises(ModelNotFoundError, match="models--tiny or models--sentence-transformers--tiny"):
        load_spec("tiny")
    code, out, err = run_export_cli(["--model", "acme/no-such-model", "--cache-dir", str(tmp_path / "c")], capsys)
    assert (code, out) == (EXIT_USAGE, "")
    assert_one_error_line(err, str(hub), "models--acme--no-such-model")


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model_path(str(tmp_path / "model.onnx"))


def test_folder_without_config_is_not_a_transformers_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_spec(str(tmp_path / "empty"))


def test_hub_id_resolves_to_the_snapshot_that_refs_main_names(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    source = write_spec_folder(tmp_path / "src", pooling_config={"pooling_mode": "cls"})
    wanted = fake_hub_snapshot(hub, "acme/tiny", source, "a" * 40)
    # A newer snapshot that refs/main does not name must not be picked.
    fake_hub_snapshot(hub, "acme/tiny", source, "b" * 40, ref=False)
    spec = load_spec("acme/tiny")
    assert spec.root == wanted and spec.name == "acme/tiny"
    assert spec.pooling == (Pooling.CLS,)


def test_bare_name_resolves_under_the_sentence_transformers_organisation(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    source = write_spec_folder(tmp_path / "src", pooling_config={"pooling_mode": "max"})
    snapshot = fake_hub_snapshot(hub, "sentence-transformers/tiny-st", source, "c" * 40, ref=False)
    assert resolve_model_path("tiny-st") == snapshot
    assert load_spec("tiny-st").pooling == (Pooling.MAX,)


def test_hf_home_locates_the_hub_cache_when_hf_hub_cache_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    source = write_spec_folder(tmp_path / "src", pooling_config={"pooling_mode": "mean"})
    snapshot = fake_hub_snapshot(tmp_path / "hf-home" / "hub", "acme/home", source, "d" * 40)
    assert resolve_model_path("acme/home") == snapshot


def test_no_model_given_means_the_shipped_default():
    spec = load_spec(None)
    assert (spec.root / "modules.json").is_file() and spec.sentence_transformers_config
    assert spec.pooling == (Pooling.MEAN,) and spec.has_normalize
    assert (spec.dim, spec.max_seq_length, spec.model_type) == (384, 256, "bert")
    assert json.loads((spec.root / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
