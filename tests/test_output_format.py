"""Index-ready output (issue 17): --truncate-dim, --output-dtype, --calibration, --with-token-counts and
--text-template, each against sentence-transformers, through the command lines and the Python API.

The oracle for the stored values is sentence-transformers' own quantize_embeddings, fed the job's float32
vectors (the same options, so the same bits) and the ranges the file records: equality is exact. Against
sentence-transformers' own float vectors (which differ in the last bits) a value may sit on the other side of
a step: there the test allows a difference of one step in a few values.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import fault_env
from models import MAX_SEQ_LENGTH, TEXTS, assert_vectors_match, corpus_lines, update_json
from test_job import make_corpus
from test_options_e2e import sentence_transformer
from test_resume import run_job

from embedder import Embedder
from embedder.config import OutputOptions
from embedder.infer.vectors import VectorFormat, quantization_ranges
from embedder.model.spec import load_spec
from jobs.embed import main as embed_main
from jobs.embed_ray import main as embed_ray_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Real text, the test texts ('' and one past max_seq_length among them), and null rows.
ROWS = [None, *corpus_lines()[:60], *TEXTS, None]
WINDOW = 40  # two windows: the ranges come from the first one only
# The model, its --truncate-dim and the flags the job and sentence-transformers share. all-MiniLM-L6-v2 cut to
# 128 of 384 dimensions; the tiny bert (16) cut to 12, whose 12 bits pack into 2 bytes (the last one padded). The
# tiny bert pools by mean: its CLS vector hardly depends on the text (see test_options_e2e.py).
FAMILIES = {"default": (128, []), "bert": (12, ["--pooling", "mean"])}
DTYPES = ("float16", "int8", "uint8", "binary", "ubinary")


def st_quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    from sentence_transformers.util.quantization import quantize_embeddings

    return quantize_embeddings(vectors, precision=precision, ranges=ranges)


def run_embed(folder: Path, table: pa.Table, args: list[str], *flags: str) -> tuple[pa.Table, dict]:
    """jobs.embed on the CPU; the output table and its `embedder` metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    source, out = folder / "in.parquet", folder / "out.parquet"
    pq.write_table(table, source)
    assert embed_main(["--in", str(source), "--out", str(out), "--device", "cpu", "--progress", "off",
                       "--log-level", "WARNING", *args, *flags]) == 0
    result = pq.read_table(out)
    return result, json.loads(result.schema.metadata[b"embedder"])


def stored(table: pa.Table) -> np.ndarray:
    """The non-null stored vectors, in row order, in their stored dtype."""
    column = table.column("embedding").combine_chunks()
    present = column.drop_null()
    return present.flatten().to_numpy(zero_copy_only=False).reshape(len(present), column.type.list_size)


def hamming(packed: np.ndarray) -> np.ndarray:
    """Every pair's Hamming distance between packed sign-bit vectors (int8 or uint8 bytes)."""
    bits = np.unpackbits(packed.view(np.uint8), axis=1).astype(np.int32)
    return (bits[:, None, :] != bits[None, :, :]).sum(axis=2)


@pytest.fixture(scope="module", params=list(FAMILIES))
def runs(request, model_zoo, export_cache_dir, tmp_path_factory) -> dict:
    """One family's job output for float32 and every dtype, all at its --truncate-dim, plus its references."""
    family = request.param
    dim, flags = FAMILIES[family]
    model_arg = model_zoo.model_arg(family)
    args = [*(["--model", model_arg] if model_arg else []), "--cache-dir", str(export_cache_dir),
            "--window-rows", str(WINDOW), "--truncate-dim", str(dim), *flags]
    table = pa.table({"id": range(len(ROWS)), "text": pa.array(ROWS, pa.string())})
    root = tmp_path_factory.mktemp(f"output-{family}")
    outputs = {"float32": run_embed(root / "float32", table, args)}
    for dtype in DTYPES:
        outputs[dtype] = run_embed(root / dtype, table, args, "--output-dtype", dtype)
    # int8 from a calibration file: the float32 output itself (already cut to dim dimensions).
    outputs["int8-file"] = run_embed(root / "int8-file", table, args, "--output-dtype", "int8", "--calibration",
                                     str(root / "float32" / "out.parquet"))

    model = sentence_transformer(model_zoo.path(family), pooling="mean" if flags else None)
    model.truncate_dim = dim
    texts = [t for t in ROWS if t is not None]
    reference = model.encode(texts, batch_size=8, convert_to_numpy=True, normalize_embeddings=True)
    first_window = [t for t in ROWS[:WINDOW] if t is not None]
    return {"family": family, "dim": dim, "outputs": outputs, "reference": reference,
            "first_window_rows": len(first_window)}


def test_truncate_dim_equals_sentence_transformers(runs):
    """The first D dimensions, normalized again: SentenceTransformer(m, truncate_dim=D).encode(normalize_embeddings=True)."""
    table, meta = runs["outputs"]["float32"]
    dim = runs["dim"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    got = stored(table)
    assert_vectors_match(got, runs["reference"])  # min cosine 0.99999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    assert (meta["dim"], meta["truncate_dim"], meta["model_dim"]) == (dim, dim, 384 if runs["family"] == "default" else 16)
    assert meta["output_dtype"] == "float32" and meta["ranges"] is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_equals_sentence_transformers_quantize_embeddings(dtype, runs):
    floats = stored(runs["outputs"]["float32"][0])
    table, meta = runs["outputs"][dtype]
    got = stored(table)
    dim = runs["dim"]
    # Same rows null, in every dtype.
    assert table.column("embedding").is_null().to_pylist() == [t is None for t in ROWS]
    assert meta["output_dtype"] == dtype and meta["dim"] == dim
    if dtype == "float16":
        assert table.schema.field("embedding").type == pa.list_(pa.float16(), dim)
        np.testing.assert_array_equal(got, floats.astype(np.float16))
        return
    if dtype in ("int8", "uint8"):
        assert table.schema.field("embedding").type == pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), dim)
        ranges = np.asarray(meta["ranges"], dtype=np.float32)
        # Calibrated on the first window's vectors only, exactly as sentence-transformers computes ranges.
        np.testing.assert_array_equal(ranges, quantization_ranges(floats[: runs["first_window_rows"]]))
        assert not np.array_equal(ranges, quantization_ranges(floats)), "the second window did not widen a range"
        assert meta["calibration"] == f"the first window ({runs['first_window_rows']} vectors)"
        np.testing.assert_array_equal(got, st_quantize(floats, dtype, ranges))
        theirs = st_quantize(runs["reference"], dtype, ranges)
        steps = np.abs(got.astype(int) - theirs.astype(int))
        assert steps.max() <= 1 and (steps == 0).mean() > 0.99
        return
    packed = pa.int8() if dtype == "binary" else pa.uint8()
    assert table.schema.field("embedding").type == pa.list_(packed, -(-dim // 8))  # 8 dimensions a byte, rounded up
    np.testing.assert_array_equal(got, st_quantize(floats, dtype))
    theirs = st_quantize(runs["reference"], dtype)
    assert got.dtype == theirs.dtype and got.shape == theirs.shape
    # The same Hamming-distance nearest neighbours as sentence-transformers' packed vectors (every one tied at
    # the nearest distance), for every row.
    ours, reference = hamming(got), hamming(theirs)
    for matrix in (ours, reference):
        np.fill_diagonal(matrix, 10**6)
    for row in range(len(got)):
        assert set(np.flatnonzero(ours[row] == ours[row].min())) == \
            set(np.flatnonzero(reference[row] == reference[row].min())), row


def test_calibration_file_sets_the_ranges(runs):
    """--calibration FILE: the ranges of all the file's vectors, not of the first window."""
    floats = stored(runs["outputs"]["float32"][0])
    table, meta = runs["outputs"]["int8-file"]
    ranges = np.asarray(meta["ranges"], dtype=np.float32)
    np.testing.assert_array_equal(ranges, quantization_ranges(floats))
    assert meta["calibration"].endswith(f"float32/out.parquet ({len(floats)} vectors)")
    np.testing.assert_array_equal(stored(table), st_quantize(floats, "int8", ranges))


# ---------------------------------------------------------------------------------------------
# Matryoshka dimensions and the model's own truncate_dim


@pytest.fixture(scope="module")
def matryoshka_bert(model_zoo, tmp_path_factory) -> Path:
    """The tiny bert with a model card naming the dims a MatryoshkaLoss trained, written as sentence-transformers'
    model card writes a loss's parameters (json.dumps(loss.get_config_dict(), indent=4) in a json block)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    path = tmp_path_factory.mktemp("matryoshka") / "bert"
    shutil.copytree(model_zoo.path("bert"), path)
    model = SentenceTransformer(str(path), device="cpu")
    loss = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), matryoshka_dims=[16, 8, 4])
    config = json.dumps({k: v if not hasattr(v, "forward") else type(v).__name__
                         for k, v in loss.get_config_dict().items()}, indent=4)
    (path / "README.md").write_text(f"---\ntags:\n- loss:MatryoshkaLoss\n---\n\n* Loss: MatryoshkaLoss with these "
                                    f"parameters:\n  ```json\n  {config}\n  ```\n")
    return path


@pytest.mark.parametrize(("dim", "warned"), [(12, True), (8, False), (16, False)])
def test_a_dim_the_model_card_does_not_name_is_a_warning(dim, warned, matryoshka_bert, caplog):
    spec = load_spec(str(matryoshka_bert))
    assert spec.matryoshka_dims == (16, 8, 4)
    with caplog.at_level(logging.WARNING, logger="embedder.infer.vectors"):
        assert VectorFormat.for_model(spec, OutputOptions(truncate_dim=dim)).dim == dim
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == warned, warnings
    if warned:
        assert "--truncate-dim 12 is not one of the dimensions" in warnings[0] and "16, 8, 4" in warnings[0]


def test_models_without_matryoshka_dims_never_warn(model_zoo, caplog):
    spec = load_spec(str(model_zoo.path("bert")))
    assert spec.matryoshka_dims == ()
    with caplog.at_level(logging.WARNING):
        VectorFormat.for_model(spec, OutputOptions(truncate_dim=3))
    assert not caplog.records


def test_the_models_truncate_dim_is_the_default_as_in_sentence_transformers(model_zoo, tmp_path):
    from sentence_transformers import SentenceTransformer

    path = tmp_path / "bert"
    shutil.copytree(model_zoo.path("bert"), path)
    update_json(path / "config_sentence_transformers.json", truncate_dim=8)
    assert SentenceTransformer(str(path), device="cpu").truncate_dim == 8  # the key sentence-transformers reads
    spec = load_spec(str(path))
    assert VectorFormat.for_model(spec, OutputOptions()).dim == 8
    assert VectorFormat.for_model(spec, OutputOptions(truncate_dim=16)).dim == 16


# ---------------------------------------------------------------------------------------------
# Templates and token counts


TEMPLATE = "{title}\n\n{body}"
TITLES = ["Reading files", None, None, "Only a title", "", "Long", None]
BODIES = ["Open the file and iterate over its lines.", "Only a body.", None, None, "", TEXTS[-1], "Ünïcödé body"]
PROMPT = "query: "


def template_texts() -> list[str | None]:
    """What the template gives each row: a null field is empty text; every field null, no text."""
    return [None if t is None and b is None else f"{t or ''}\n\n{b or ''}" for t, b in zip(TITLES, BODIES)]


@pytest.fixture(scope="module")
def template_run(model_zoo, export_cache_dir, tmp_path_factory) -> tuple[pa.Table, dict]:
    table = pa.table({"id": range(len(TITLES)), "title": TITLES, "body": BODIES, "tag": ["x"] * len(TITLES)})
    # As typed in a shell: the command line reads the two characters \n as a newline.
    return run_embed(tmp_path_factory.mktemp("template"), table,
                     ["--model", str(model_zoo.path("bert")), "--cache-dir", str(export_cache_dir), "--pooling", "mean",
                      "--prompt", PROMPT, "--text-template", TEMPLATE.replace("\n", "\\n"), "--with-token-counts"])


def test_template_with_nulls_equals_sentence_transformers(template_run, model_zoo):
    table, meta = template_run
    assert table.column_names == ["id", "tag", "text_key", "tokens", "truncated", "embedding"]  # the template's columns not carried
    texts = template_texts()
    assert table.column("embedding").is_null().to_pylist() == [t is None for t in texts]  # all-null row: null vector
    present = [t for t in texts if t is not None]
    model = sentence_transformer(model_zoo.path("bert"), pooling="mean")
    assert_vectors_match(stored(table), model.encode(present, prompt=PROMPT, batch_size=8, normalize_embeddings=True))
    assert meta["text_template"] == TEMPLATE and meta["text_column"] is None


def test_token_counts_are_the_tokens_fed_to_the_model(template_run, model_zoo):
    """Special tokens and the prompt included, cut at max_seq_length; null for a row without text."""
    table, _ = template_run
    tokenizer = sentence_transformer(model_zoo.path("bert")).tokenizer
    texts = template_texts()
    full = [None if t is None else len(tokenizer(PROMPT + t)["input_ids"]) for t in texts]
    assert table.column("tokens").type == pa.int32() and table.column("truncated").type == pa.bool_()
    assert table.column("tokens").to_pylist() == [None if n is None else min(n, MAX_SEQ_LENGTH) for n in full]
    assert table.column("truncated").to_pylist() == [None if n is None else n > MAX_SEQ_LENGTH for n in full]
    assert table.column("truncated").to_pylist().count(True) == 1  # the long body


def test_embedder_embed_with_a_template_equals_the_job(template_run, model_zoo, export_cache_dir):
    import polars as pl

    job, _ = template_run
    emb = Embedder(model_zoo.path("bert"), device="cpu", cache_dir=export_cache_dir, pooling="mean", prompt=PROMPT,
                   with_token_counts=True)
    table = pa.table({"id": range(len(TITLES)), "title": TITLES, "body": BODIES})
    out = emb.embed(table, text_template=TEMPLATE)
    assert out.column_names == ["id", "title", "body", "tokens", "truncated", "embedding"]
    for name in ("tokens", "truncated", "embedding"):
        assert out.column(name).equals(job.column(name)), name
    frame = emb.embed(pl.from_arrow(table), text_template=TEMPLATE)
    assert frame.columns == out.column_names and frame.get_column("tokens").to_list() == job.column("tokens").to_pylist()


# ---------------------------------------------------------------------------------------------
# Bad values: one line, exit 2, nothing written, nothing exported


BAD_VALUES = [
    (["--truncate-dim", "0"], "--truncate-dim must be at least 1, got 0"),
    (["--truncate-dim", "17"], "--truncate-dim 17 exceeds the model's dimension 16"),
    (["--output-dtype", "int4"], ("--output-dtype int4 is not supported; valid: float32, float16, int8, uint8, "
                                  "binary, ubinary")),
    (["--text-template", "{title} {nope} {gone}"], "columns 'nope', 'gone' not found; columns are: id, title, text"),
    (["--text-col", "text", "--text-template", "{title}"], "--text-col and --text-template are mutually exclusive"),
    (["--text-template", "{0}"], "field {0} must name a column"),
    (["--text-template", "{title}: {text}", "--keep-cols", "id,title"], "--keep-cols names title, which the text is "
                                                                         "read from"),
    (["--output-dtype", "int8", "--shard", "0/2"], "--shard with --output-dtype int8 needs --calibration FILE"),
    (["--output-dtype", "float16", "--calibration", "x.parquet"], ("--calibration sets the ranges of "
                                                                   "--output-dtype int8 or uint8, not float16")),
]
BAD_IDS = ["dim-0", "dim-above-model", "unknown-dtype", "template-missing-columns", "text-col-and-template",
           "positional-field", "keep-a-text-column", "shard-without-calibration", "calibration-without-int8"]


@pytest.mark.parametrize(("job", "flags", "message"), [
    pytest.param(job, flags, message, id=f"{job}-{name}")
    for job in ("jobs.embed", "jobs.embed_ray") for (flags, message), name in zip(BAD_VALUES, BAD_IDS)
    if not (job == "jobs.embed_ray" and "--shard" in flags)  # jobs.embed_ray has no --shard
])
def test_bad_values_are_one_line_and_exit_2(job, flags, message, model_zoo, tmp_path, capsys):
    source, out, cache = tmp_path / "in.parquet", tmp_path / "out", tmp_path / "cache"
    pq.write_table(pa.table({"id": [1, 2], "title": ["a", "b"], "text": ["x", "y"]}), source)
    main = embed_main if job == "jobs.embed" else embed_ray_main
    rc = main(["--in", str(source), "--out", str(out), "--model", str(model_zoo.path("bert")), "--cache-dir",
               str(cache), "--device", "cpu", "--progress", "off", "--log-level", "ERROR", *flags])
    captured = capsys.readouterr()
    assert (rc, captured.out) == (2, "")
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{job}: error: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]  # no output, no work folder, no export


# ---------------------------------------------------------------------------------------------
# Resume: the ranges of the first window survive a kill -9


@pytest.fixture(scope="module")
def int8_job(model_zoo, export_cache_dir, exported, tmp_path_factory) -> tuple[list[str], pa.Table]:
    """jobs.embed --output-dtype int8 over 500 docstring rows in windows of 100, and its uninterrupted output."""
    exported("bert")
    corpus = make_corpus(tmp_path_factory.mktemp("int8-corpus") / "parts", rows=500, files=2, row_group_rows=100,
                         null_fraction=0.02)
    args = ["--in", str(corpus), "--model", str(model_zoo.path("bert")), "--cache-dir", str(export_cache_dir),
            "--window-rows", "100", "--progress", "off", "--threads", "1", "--device", "cpu", "--pooling", "mean",
            "--output-dtype", "int8", "--with-token-counts"]
    out = tmp_path_factory.mktemp("int8-reference") / "vecs.parquet"
    assert embed_main([*args, "--out", str(out)]) == 0
    return args, pq.read_table(out)


def test_a_resumed_int8_run_is_bit_identical(int8_job, tmp_path):
    args, reference = int8_job
    out = tmp_path / "vecs.parquet"
    killed = run_job([*args, "--out", str(out)], **fault_env(tmp_path / "fault.json", point="window", count=3))
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    resumed = run_job([*args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_rows"] == 300
    table = pq.read_table(out)
    # Ranges from window 0 (committed before the kill), not from window 3 where the rerun starts embedding.
    assert table.equals(reference) and table.schema.metadata == reference.schema.metadata



# ---------------------------------------------------------------------------------------------
# The README's int8 search example runs as printed


def test_readme_int8_search_example(export_cache_dir, tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Searching int8 vectors"):]
    command = re.search(r"```bash\n(python -m jobs\.embed [^\n]+)\n```", section).group(1).split()[3:]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    query = re.search(r'encode\(\["([^"]+)"\]\)', code).group(1)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDDER_CACHE", str(export_cache_dir))  # the example's Embedder() finds the test's graph
    (tmp_path / "data").mkdir()
    texts = [*corpus_lines()[:150], query, None]
    pq.write_table(pa.table({"id": range(len(texts)), "text": texts}), "data/sample.parquet")
    assert embed_main([*command, "--device", "cpu", "--progress", "off", "--log-level", "WARNING"]) == 0
    capsys.readouterr()  # the job's metrics line
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code, run as printed)
    ids = json.loads(capsys.readouterr().out.split("]")[0] + "]")
    assert ids[0] == texts.index(query)  # the query's own row ranks first
    assert namespace["scores"].shape == (len(texts) - 1,)
