"""embedder.build.export: one ONNX graph per model that reproduces sentence-transformers' vectors.

Every family is exported once per session (conftest `exported`) and run the way the job runs it:
TextTokenizer -> plan_batches -> pad_batch -> Encoder.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from models import (
    ALL_FAMILIES,
    MAX_SEQ_LENGTH,
    TEXTS,
    TINY_FAMILIES,
    assert_vectors_match,
    cosines,
    onnx_vectors,
    reference_pooler_vectors,
    reference_vectors,
)
from tokenizers import Tokenizer

from embedder import ExportOptions, Pooling, get_or_export, load_spec
from embedder.errors import EXIT_USAGE, UnsupportedModelError
from jobs.export import main as export_main

pytestmark = pytest.mark.slow

BATCH_SIZES = (1, 3, 64)
# The shipped model's max_seq_length is 256: every length would take minutes, so a spread of them.
DEFAULT_MODEL_LENGTHS = (1, 2, 3, 17, 64, 128, 255, 256)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_onnx_vectors_equal_sentence_transformers_encode(model_zoo, exported, family):
    """Both graphs of an entry: the plain one the CPU runs and the fused one CUDA runs (here on the CPU)."""
    artifact = exported(family)
    want = reference_vectors(model_zoo.path(family), TEXTS)
    assert set(artifact.graphs) == {"cpu", "cuda"} and artifact.graphs["cpu"] != artifact.graphs["cuda"]
    for graph in ("cpu", "cuda"):
        assert_vectors_match(onnx_vectors(artifact, TEXTS, graph=graph), want)


@pytest.mark.parametrize("family", ["bert", "roberta", "default"])
def test_cpu_gets_the_plain_graph_and_cuda_the_fused_one(exported, family):
    """Offline Attention fusion pays on CUDA, not at the CPU's batch sizes (scripts/bench_graphs.py)."""
    import onnx

    artifact = exported(family)
    ops = {kind: {n.op_type for n in onnx.load(str(path)).graph.node} for kind, path in artifact.graphs.items()}
    assert artifact.manifest.record["optimization"]["applied"]
    assert "Attention" in ops["cuda"] and "SkipLayerNormalization" in ops["cuda"]
    assert "Attention" not in ops["cpu"] and "Softmax" in ops["cpu"]
    assert artifact.graphs["cpu"] == artifact.graph_path != artifact.graphs["cuda"]
    assert set(artifact.manifest.files) == {"model.onnx", "model.cuda.onnx", "tokenizer.json"}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_test_texts_exercise_truncation(exported, family):
    """The longest text is cut at max_seq_length, so the equality above covers truncation."""
    from embedder.infer.tokenize import TextTokenizer

    artifact = exported(family)
    max_len = artifact.manifest.max_seq_length
    window = TextTokenizer(artifact.tokenizer_path, max_len).encode(TEXTS)
    assert window.lengths.max() == max_len and window.truncated >= 1
    assert window.lengths.min() >= 1


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_padding_is_masked_out_of_the_vector(exported, family):
    """A row's vector is the same alone and in a padded batch with longer rows."""
    artifact = exported(family)
    together = onnx_vectors(artifact, TEXTS, max_tokens=10**6, max_batch_size=len(TEXTS))
    alone = onnx_vectors(artifact, TEXTS, max_tokens=10**6, max_batch_size=1)
    assert_vectors_match(together, alone)


def synthetic_feeds(session, vocab_size: int, batch: int, length: int, rng) -> dict[str, np.ndarray]:
    """Random ids, right-padded rows of random lengths (the first row full length), for every graph input."""
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(5, vocab_size, size=(batch, length)), 0).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {i.name: feeds[i.name] for i in session.get_inputs()}


def assert_runs_at_every_shape(artifact, lengths) -> None:
    """Output [batch, dim], finite, unit norm, at every batch size and length given."""
    session = ort.InferenceSession(str(artifact.graph_path), providers=["CPUExecutionProvider"])
    vocab_size = Tokenizer.from_file(str(artifact.tokenizer_path)).get_vocab_size()
    dim = artifact.manifest.dim
    rng = np.random.default_rng(0)
    for batch in BATCH_SIZES:
        for length in lengths:
            out = session.run(["sentence_embedding"], synthetic_feeds(session, vocab_size, batch, length, rng))[0]
            assert out.shape == (batch, dim), (batch, length)
            assert out.dtype == np.float32 and np.isfinite(out).all(), (batch, length)
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5, err_msg=f"{batch}x{length}")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_graph_runs_at_any_batch_size_and_every_length(exported, family):
    artifact = exported(family)
    assert_runs_at_every_shape(artifact, range(1, artifact.manifest.max_seq_length + 1))


def test_default_graph_runs_at_any_batch_size_and_length_up_to_its_maximum(exported):
    artifact = exported("default")
    assert artifact.manifest.max_seq_length == DEFAULT_MODEL_LENGTHS[-1]
    assert_runs_at_every_shape(artifact, DEFAULT_MODEL_LENGTHS)


# ---------------------------------------------------------------------------------------------
# Pooling overrides and options


def test_pooler_pooling_on_bert_exports_the_pooler_output(model_zoo, exported):
    pooler = onnx_vectors(exported("bert", (Pooling.POOLER,)), TEXTS)
    want = reference_pooler_vectors(model_zoo.path("bert"), TEXTS, MAX_SEQ_LENGTH)
    assert_vectors_match(pooler, want)
    for other in ((Pooling.CLS,), (Pooling.MEAN,)):
        vectors = onnx_vectors(exported("bert", other), TEXTS)
        assert (cosines(pooler, vectors) < 0.999).all(), f"pooler vectors equal {other[0].value} vectors"
    assert exported("bert", (Pooling.POOLER,)).manifest.pooling == ("pooler",)


def test_pooler_pooling_on_distilbert_is_a_clear_error(model_zoo, tmp_path, capsys):
    path = str(model_zoo.path("distilbert"))
    with pytest.raises(UnsupportedModelError, match="--pooling pooler: distilbert model .* has no pooler layer"):
        get_or_export(load_spec(path, (Pooling.POOLER,)), ExportOptions(), tmp_path / "cache")
    capsys.readouterr()
    argv = ["--model", path, "--pooling", "pooler", "--cache-dir", str(tmp_path / "cli-cache"), "--log-level", "ERROR"]
    code = export_main(argv)
    captured = capsys.readouterr()
    assert (code, captured.out) == (EXIT_USAGE, "")
    assert captured.err.strip().splitlines() == [f"jobs.export: error: --pooling pooler: distilbert model {path} "
                                                 "has no pooler layer"]


def test_no_normalize_graph_returns_the_pipelines_raw_vectors(model_zoo, tmp_path):
    spec = load_spec(str(model_zoo.path("roberta")))
    artifact = get_or_export(spec, ExportOptions(normalize=False), tmp_path / "cache")
    got = onnx_vectors(artifact, TEXTS)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    assert_vectors_match(got, reference_vectors(model_zoo.path("roberta"), TEXTS, normalize=False))


def test_prompt_excluded_from_pooling_is_reproduced_or_refused(model_zoo, tmp_path):
    """include_prompt=False: sentence-transformers attends to the prompt but leaves its tokens out of
    the mean. A graph fed only attention_mask cannot know where the prompt ends, so the export must
    either reproduce these vectors or refuse the model; silently giving other vectors is the bug."""
    path = model_zoo.path("prompt_excluded")
    try:
        artifact = get_or_export(load_spec(str(path)), ExportOptions(), tmp_path / "cache")
    except UnsupportedModelError as refused:
        assert "prompt" in str(refused)
        return
    assert_vectors_match(onnx_vectors(artifact, TEXTS), reference_vectors(path, TEXTS))
