"""Shared test builders: tiny sentence-transformers models, fake model folders, ONNX encoding.

Every model is built from a transformers config class with random weights (fixed seeds) and tiny
sizes, and saved with sentence-transformers' own module classes, so the files on disk are exactly
what a real sentence-transformers save writes. Nothing here touches the network.

torch, transformers and sentence-transformers are imported inside the builders only, so test
modules that never build a model stay fast to import.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

HIDDEN = 32
LAYERS = 2
HEADS = 2
INTERMEDIATE = 37
DENSE_OUT = 16
MAX_SEQ_LENGTH = 32
XLMR_MAX_SEQ_LENGTH = 48
PLAIN_MAX_POSITIONS = 40
SEED = 1234

# Acceptance thresholds for ONNX vectors against sentence-transformers' own encode().
MIN_COSINE = 0.99999
MAX_ABS_DIFF = 1e-4

LONG_TEXT = " ".join(
    ["The exported graph must truncate a text that is longer than the model's maximum sequence length."] * 40
)
# Varied lengths and scripts: empty, one letter, mixed case, Cyrillic, CJK, Arabic, and one text
# longer than any model's max_seq_length (the default model's is 256 tokens).
TEXTS = [
    "",
    "A",
    "The quick brown fox jumps over the lazy dog.",
    "Sentence Embeddings Are Pooled, Projected And Normalized Inside The Graph",
    "Привет, мир! Как дела сегодня?",
    "机器学习模型把句子变成向量。",
    "مرحبا بالعالم، هذا اختبار قصير.",
    "mixed 混合 текст and numbers 12345",
    LONG_TEXT,
]

# Families built by ModelZoo (see BUILDERS); "default" is the shipped all-MiniLM-L6-v2.
TINY_FAMILIES = ("bert", "roberta", "distilbert", "plain_bert", "xlmr", "bert_sqrt_len", "bert_weightedmean",
                 "bert_lasttoken")
# Families whose graph takes token_type_ids (their tokenizer and model both use them).
TOKEN_TYPE_FAMILIES = ("bert", "plain_bert", "bert_sqrt_len", "bert_weightedmean", "bert_lasttoken", "default")
ALL_FAMILIES = (*TINY_FAMILIES, "default")

_SPECIAL_WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SPECIAL_ROBERTA = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


# --------------------------------------------------------------------------------------------
# Text for vocabularies


def corpus_lines() -> list[str]:
    """Real English text: docstrings of standard-library modules, plus the test texts."""
    import argparse
    import dataclasses
    import functools
    import inspect
    import itertools
    import logging
    import pathlib
    import textwrap
    import unittest

    lines: list[str] = []
    for module in (argparse, collections, dataclasses, functools, inspect, itertools, json, logging, pathlib,
                   re, textwrap, unittest):
        docs = [module.__doc__ or ""]
        docs += [getattr(obj, "__doc__", None) or "" for name, obj in sorted(vars(module).items())
                 if callable(obj) and not name.startswith("_")]
        lines += [line.strip() for doc in docs for line in doc.splitlines() if line.strip()]
    return lines + [t for t in TEXTS if t]


def wordpiece_vocab(size: int = 600) -> list[str]:
    """A WordPiece vocabulary: specials, single characters (plain and ##), then frequent words."""
    text = " ".join(corpus_lines()).lower()
    chars = sorted({c for c in text if not c.isspace()})
    words = collections.Counter(re.findall(r"\w+", text))
    frequent = [w for w, _ in words.most_common() if len(w) > 1][: max(0, size - 2 * len(chars))]
    vocab = _SPECIAL_WORDPIECE + chars + ["##" + c for c in chars if c.isalnum()] + frequent
    return list(dict.fromkeys(vocab))


def wordpiece_tokenizer(cls, folder: Path):
    """A WordPiece tokenizer of class cls (BertTokenizerFast, DistilBertTokenizerFast) from a vocab.txt.

    Loaded with from_pretrained from a folder holding only vocab.txt: transformers 5 ignores the
    vocab_file= keyword of these classes and would silently give a 5-token vocabulary.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(wordpiece_vocab()) + "\n", encoding="utf-8")
    return cls.from_pretrained(str(folder))


def byte_level_bpe_tokenizer(vocab_size: int = 700):
    """A RoBERTa-style tokenizer: byte-level BPE trained on real text, <s> A </s>, no token types."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_ROBERTA,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_lines(), trainer=trainer)
    backend.post_processor = processors.RobertaProcessing(
        ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")), add_prefix_space=False
    )
    return _wrap_backend(PreTrainedTokenizerFast, backend)


def unigram_tokenizer(vocab_size: int = 500):
    """An XLM-R-style tokenizer: Unigram with Metaspace, <s> A </s>, no token types."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIAL_ROBERTA, unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(corpus_lines(), trainer=trainer)
    bos, eos = backend.token_to_id("<s>"), backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return _wrap_backend(PreTrainedTokenizerFast, backend)


def _wrap_backend(cls, backend):
    return cls(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_input_names=["input_ids", "attention_mask"],
    )


# --------------------------------------------------------------------------------------------
# Model builders: each writes one model folder and returns it


def _seeded(build: Callable):
    """build() with torch's random generator at SEED, so weights are the same in every session."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-tensor bars would flood captured output
    torch.manual_seed(SEED)
    return build()


def _save_hf(model, tokenizer, folder: Path) -> Path:
    """A plain transformers checkpoint (config, weights, tokenizer files)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def save_sentence_transformer(hf_folder: Path, out: Path, max_seq_length: int, tail: Callable[[], list]) -> Path:
    """Load hf_folder as a sentence-transformers Transformer, append the modules from tail(), save to out."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Transformer

    transformer = Transformer(str(hf_folder), max_seq_length=max_seq_length)
    SentenceTransformer(modules=[transformer, *_seeded(tail)], device="cpu").save(str(out))
    return out


def _bert_config(vocab_size: int, max_positions: int = 64):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=max_positions,
    )


def _bert_checkpoint(folder: Path, max_positions: int = 64) -> Path:
    from transformers import BertModel, BertTokenizerFast

    tokenizer = wordpiece_tokenizer(BertTokenizerFast, folder.parent / (folder.name + "-vocab"))
    model = _seeded(lambda: BertModel(_bert_config(tokenizer.vocab_size, max_positions)))
    return _save_hf(model, tokenizer, folder)


def build_bert(root: Path) -> Path:
    """BERT, WordPiece, CLS pooling, Dense(32 -> 16, Tanh), Normalize; has token_type_ids."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling

    hf = _bert_checkpoint(root / "bert-hf")
    return save_sentence_transformer(
        hf,
        root / "bert",
        MAX_SEQ_LENGTH,
        lambda: [
            Pooling(HIDDEN, pooling_mode="cls"),
            Dense(HIDDEN, DENSE_OUT, activation_function=torch.nn.Tanh()),
            Normalize(),
        ],
    )


def build_plain_bert(root: Path) -> Path:
    """A plain transformers BERT checkpoint: no modules.json, max length from max_position_embeddings."""
    return _bert_checkpoint(root / "plain_bert", max_positions=PLAIN_MAX_POSITIONS)


def _roberta_like_config(config_cls, tokenizer, max_seq_length: int):
    """A tiny RoBERTa-family config: one token type, positions offset by padding_idx + 1."""
    return config_cls(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=max_seq_length + 2,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_roberta(root: Path) -> Path:
    """RoBERTa with byte-level BPE, mean pooling, no Normalize module, no token_type_ids input."""
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import RobertaConfig, RobertaModel

    tokenizer = byte_level_bpe_tokenizer()
    config = _roberta_like_config(RobertaConfig, tokenizer, MAX_SEQ_LENGTH)
    hf = _save_hf(_seeded(lambda: RobertaModel(config)), tokenizer, root / "roberta-hf")
    return save_sentence_transformer(hf, root / "roberta", MAX_SEQ_LENGTH, lambda: [Pooling(HIDDEN, "mean")])


def build_distilbert(root: Path) -> Path:
    """DistilBERT (no pooler, no token types), WordPiece, max pooling, Normalize."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizerFast

    tokenizer = wordpiece_tokenizer(DistilBertTokenizerFast, root / "distilbert-vocab")
    config = DistilBertConfig(
        vocab_size=tokenizer.vocab_size,
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=INTERMEDIATE,
        max_position_embeddings=64,
    )
    hf = _save_hf(_seeded(lambda: DistilBertModel(config)), tokenizer, root / "distilbert-hf")
    return save_sentence_transformer(
        hf, root / "distilbert", MAX_SEQ_LENGTH, lambda: [Pooling(HIDDEN, "max"), Normalize()]
    )


def build_xlmr(root: Path) -> Path:
    """XLM-R with a Unigram tokenizer, pooling ["mean", "cls"] (list form, concatenated: 64 values).

    Its sentence_bert_config.json also carries the legacy keys max_seq_length and do_lower_case, as
    models saved by older sentence-transformers do, so both must be honoured.
    """
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tokenizer = unigram_tokenizer()
    config = _roberta_like_config(XLMRobertaConfig, tokenizer, XLMR_MAX_SEQ_LENGTH)
    hf = _save_hf(_seeded(lambda: XLMRobertaModel(config)), tokenizer, root / "xlmr-hf")
    # The tokenizer says 512 (as real XLM-R's does); the legacy max_seq_length key must win over it.
    out = save_sentence_transformer(
        hf, root / "xlmr", 512, lambda: [Pooling(HIDDEN, pooling_mode=["mean", "cls"]), Normalize()]
    )
    update_json(out / "sentence_bert_config.json", max_seq_length=XLMR_MAX_SEQ_LENGTH, do_lower_case=True)
    return out


def _pooling_variant(name: str, mode: str, tail: Callable[[], list]) -> Callable[[Path], Path]:
    """A builder: a fresh tiny BERT checkpoint under pooling `mode` followed by the modules from tail()."""

    def build(root: Path) -> Path:
        from sentence_transformers.sentence_transformer.modules import Pooling

        hf = _bert_checkpoint(root / f"{name}-hf")
        return save_sentence_transformer(hf, root / name, MAX_SEQ_LENGTH, lambda: [Pooling(HIDDEN, mode), *tail()])

    return build


def _normalize_only() -> list:
    from sentence_transformers.sentence_transformer.modules import Normalize

    return [Normalize()]


def _relu_no_bias_then_gelu() -> list:
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    return [
        Dense(HIDDEN, 24, bias=False, activation_function=torch.nn.ReLU()),
        Dense(24, 8, activation_function=torch.nn.GELU()),
        Normalize(),
    ]


def _mean_without_prompt() -> list:
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    return [Pooling(HIDDEN, "mean", include_prompt=False), Normalize()]


def build_prompt_excluded(root: Path) -> Path:
    """BERT whose default prompt "query: " is excluded from mean pooling (include_prompt=False), as
    INSTRUCTOR-style models do: the prompt tokens are attended to but not averaged."""
    hf = _bert_checkpoint(root / "prompt_excluded-hf")
    out = save_sentence_transformer(hf, root / "prompt_excluded", MAX_SEQ_LENGTH, _mean_without_prompt)
    update_json(out / "config_sentence_transformers.json", prompts={"query": "query: "}, default_prompt_name="query")
    return out


def _sigmoid_without_normalize() -> list:
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense

    return [Dense(HIDDEN, 12, activation_function=torch.nn.Sigmoid())]


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "bert": build_bert,
    "roberta": build_roberta,
    "distilbert": build_distilbert,
    "plain_bert": build_plain_bert,
    "xlmr": build_xlmr,
    # The remaining pooling modes and Dense activations, each on its own tiny BERT.
    "bert_sqrt_len": _pooling_variant("bert_sqrt_len", "mean_sqrt_len_tokens", _normalize_only),
    "bert_weightedmean": _pooling_variant("bert_weightedmean", "weightedmean", _relu_no_bias_then_gelu),
    "bert_lasttoken": _pooling_variant("bert_lasttoken", "lasttoken", _sigmoid_without_normalize),
    # Not in TINY_FAMILIES: the exporter does not reproduce it yet (see test_export).
    "prompt_excluded": build_prompt_excluded,
}


# --------------------------------------------------------------------------------------------
# JSON-only model folders for spec tests (load_spec reads no weights)


def update_json(path: Path, **values) -> None:
    """Merge values into a JSON object file."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(values)
    path.write_text(json.dumps(data, indent=2))


def write_json(path: Path, data) -> Path:
    """Write data as JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def module_entry(idx: int, kind: str, path: str) -> dict:
    """One modules.json entry, with the class path sentence-transformers 6.2 writes."""
    packages = {
        "Transformer": "sentence_transformers.base.modules.transformer",
        "Dense": "sentence_transformers.base.modules.dense",
        "Normalize": "sentence_transformers.base.modules.normalize",
        "Pooling": "sentence_transformers.sentence_transformer.modules.pooling",
        "LayerNorm": "sentence_transformers.sentence_transformer.modules.layer_norm",
        "WordEmbeddings": "sentence_transformers.sentence_transformer.modules.word_embeddings",
    }
    return {"idx": idx, "name": str(idx), "path": path, "type": f"{packages[kind]}.{kind}"}


def write_spec_folder(
    root: Path,
    pooling_config: dict | None = None,
    dense: Sequence[dict] = (),
    normalize: bool = True,
    extra_modules: Sequence[str] = (),
    hidden_size: int = HIDDEN,
    max_position_embeddings: int = 64,
) -> Path:
    """A model folder with only the JSON that load_spec reads: config.json, modules.json, module configs."""
    write_json(root / "config.json", {"model_type": "bert", "hidden_size": hidden_size,
                                      "max_position_embeddings": max_position_embeddings})
    modules = [module_entry(0, "Transformer", "")]
    if pooling_config is not None:
        modules.append(module_entry(1, "Pooling", "1_Pooling"))
        write_json(root / "1_Pooling" / "config.json", pooling_config)
    for config in dense:
        folder = f"{len(modules)}_Dense"
        modules.append(module_entry(len(modules), "Dense", folder))
        write_json(root / folder / "config.json", config)
    for kind in extra_modules:
        modules.append(module_entry(len(modules), kind, f"{len(modules)}_{kind}"))
    if normalize:
        modules.append(module_entry(len(modules), "Normalize", f"{len(modules)}_Normalize"))
    write_json(root / "modules.json", modules)
    return root


def fake_hub_snapshot(cache: Path, repo_id: str, source: Path, sha: str, ref: bool = True) -> Path:
    """Copy source into CACHE/models--org--name/snapshots/<sha>/ (the Hugging Face cache layout), and
    point refs/main at it if ref."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    shutil.copytree(source, snapshot)
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha + "\n")
    return snapshot


# --------------------------------------------------------------------------------------------
# Encoding, the way the job does it, and reference encoding


def onnx_vectors(artifact, texts: list[str], max_tokens: int = 256, max_batch_size: int = 4,
                 graph: str = "cpu", device: str = "cpu") -> np.ndarray:
    """Vectors from the cache entry's graph for `graph` ("cpu" or "cuda"), run on `device` ("cpu" runs any
    graph on the CPU provider; "cuda" must really get CUDA): TextTokenizer -> plan_batches -> pad_batch ->
    Encoder, in input order."""
    from embedder.infer.batching import pad_batch, plan_batches
    from embedder.infer.devices import CUDA
    from embedder.infer.session import create_encoder
    from embedder.infer.tokenize import TextTokenizer, resolve_prompt

    manifest = artifact.manifest
    prompt = resolve_prompt(None, manifest.prompts, manifest.default_prompt_name)
    window = TextTokenizer(artifact.tokenizer_path, manifest.max_seq_length, prompt).encode(texts)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    # On the CPU any graph file runs (fp16 too, with onnxruntime's casts), whatever the job would allow there.
    precision = artifact.precision if kind == "cuda" else "fp32"
    encoder = create_encoder({kind: artifact.graphs[graph]}, device=device, precision=precision)
    assert (encoder.provider == CUDA) == (kind == "cuda"), encoder.provider
    vectors = np.full((len(texts), manifest.dim), np.nan, dtype=np.float32)
    for rows in plan_batches(window.lengths, max_tokens, max_batch_size):
        batch = pad_batch(window.ids, window.offsets, rows, manifest.pad_token_id)
        vectors[batch.rows] = encoder(batch.input_ids, batch.attention_mask)
    return vectors


def reference_vectors(model_path: Path, texts: list[str], normalize: bool = True) -> np.ndarray:
    """sentence-transformers' own vectors for the same texts."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu")
    return model.encode(texts, normalize_embeddings=normalize, batch_size=4, convert_to_numpy=True)


def reference_pooler_vectors(model_path: Path, texts: list[str], max_length: int) -> np.ndarray:
    """BERT's pooler_output through the model's own Dense module, L2-normalized (what --pooling pooler means)."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModel.from_pretrained(str(model_path)).eval()
    dense = Dense.load(str(model_path / "2_Dense")).eval()
    features = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        pooled = model(**features).pooler_output
        vectors = dense({"sentence_embedding": pooled})["sentence_embedding"]
        return torch.nn.functional.normalize(vectors, dim=1).numpy()


def one_matmul(tmp_path: Path, w: np.ndarray, rank: int, bias: np.ndarray | None = None) -> Path:
    """A graph of one weight MatMul named "proj" (and a bias Add) on an input "x" of this rank."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dims = ["batch", "tokens", w.shape[0]][-rank:]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw" if bias is not None else "y"], name="proj")]
    initializers = [numpy_helper.from_array(w, "w")]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["xw", "b"], ["y"], name="bias"))
        initializers.append(numpy_helper.from_array(bias, "b"))
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    path = tmp_path / f"fp32-{rank}.onnx"
    onnx.save(helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run_graph(path: Path, x: np.ndarray) -> np.ndarray:
    """The graph's output for input "x" on the CPU provider."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_vectors_match(got: np.ndarray, want: np.ndarray) -> None:
    """Same shape, min cosine >= MIN_COSINE and max abs diff <= MAX_ABS_DIFF."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    min_cos, max_abs = float(cosines(got, want).min()), float(np.abs(got - want).max())
    assert min_cos >= MIN_COSINE and max_abs <= MAX_ABS_DIFF, f"min cosine {min_cos:.8f}, max abs diff {max_abs:.3g}"


# --------------------------------------------------------------------------------------------
# Subprocesses


def module_command(module: str, *args) -> list[str]:
    """argv for `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *(str(a) for a in args)]


def run_python(code: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -c code args...` from the repository root; text output captured."""
    return subprocess.run(
        [sys.executable, "-c", code, *(str(a) for a in args)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )
