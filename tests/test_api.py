"""The Python API: Embedder.encode and .embed against sentence-transformers and against jobs.embed's own
output, embed_parquet as the job, and `import embedder` staying cheap."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from models import TEXTS, assert_vectors_match, corpus_lines, reference_vectors, run_python

import embedder
from embedder import Embedder, embed_parquet
from embedder.errors import InputError, OutputExistsError, UnsupportedModelError, UsageError
from jobs.embed import main as embed_main

pytestmark = pytest.mark.slow

DIM = 384  # all-MiniLM-L6-v2
# Real text of varied lengths, then the test texts ('' and one past max_seq_length among them).
JOB_TEXTS = corpus_lines()[:50] + TEXTS
# Small windows and batches, so that the comparisons with the job cross several of each. A row's bits depend on
# its batch (padded or not, alone or not); with these options, other window edges change some rows' bits.
SMALL_BATCHING = {"window_rows": 4, "max_tokens": 256}


@pytest.fixture(scope="module")
def default_embedder(export_cache_dir) -> Embedder:
    return Embedder(device="cpu", cache_dir=export_cache_dir)


@pytest.fixture(scope="module")
def small_batches(export_cache_dir) -> Embedder:
    """The default model again, batching as SMALL_BATCHING (the same cache entry: no second export)."""
    return Embedder(device="cpu", cache_dir=export_cache_dir, **SMALL_BATCHING)


def with_nulls(texts: list[str]) -> list[str | None]:
    """Every third row null, starting with the first."""
    return [None if i % 3 == 0 else t for i, t in enumerate(texts)]


def job_vectors(table: pa.Table, tmp_path, export_cache_dir, *flags: str) -> pa.Table:
    """jobs.embed's output for this table, run on the CPU with the given flags."""
    source, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, source)
    assert embed_main(["--in", str(source), "--out", str(out), "--cache-dir", str(export_cache_dir),
                       "--device", "cpu", "--progress", "off", *flags]) == 0
    return pq.read_table(out)


def batching_flags(options: dict) -> list[str]:
    return [arg for name, value in options.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def embedding_matrix(column) -> np.ndarray:
    """The non-null vectors of an embedding column (pyarrow or polars), in row order."""
    array = column.to_arrow() if hasattr(column, "to_arrow") else column
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    array = array.drop_null()
    return array.flatten().to_numpy().reshape(len(array), -1)


def test_properties_say_what_runs(default_embedder):
    assert default_embedder.dim == DIM and default_embedder.max_seq_length == 256
    assert default_embedder.device == "cpu" and default_embedder.provider == "CPUExecutionProvider"


@pytest.mark.parametrize("family", ["default", "roberta", "distilbert"])
def test_encode_equals_sentence_transformers(family, model_zoo, export_cache_dir, default_embedder):
    model = None if family == "default" else model_zoo.path(family)
    emb = default_embedder if model is None else Embedder(model, device="cpu", cache_dir=export_cache_dir)
    got = emb.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), emb.dim)
    assert_vectors_match(got, reference_vectors(model_zoo.path(family), TEXTS))  # min cosine 0.99999


def test_encode_is_bit_identical_to_the_job(small_batches, default_embedder, tmp_path, export_cache_dir):
    job = job_vectors(pa.table({"text": JOB_TEXTS}), tmp_path, export_cache_dir, *batching_flags(SMALL_BATCHING))
    got = small_batches.encode(JOB_TEXTS)
    assert np.array_equal(got, embedding_matrix(job.column("embedding")))
    # The check can fail: batched another way (one window, bigger batches), the same texts get other bits.
    assert not np.array_equal(got, default_embedder.encode(JOB_TEXTS)), "batching no longer shows in the bits"


def test_embed_with_nulls_is_bit_identical_to_the_job(small_batches, tmp_path, export_cache_dir):
    # Nulls count towards a window's rows, so they move the windows' edges: embed must cut where the job does.
    texts = with_nulls(JOB_TEXTS)
    table = pa.table({"id": range(len(texts)), "text": texts})
    job = job_vectors(table, tmp_path, export_cache_dir, *batching_flags(SMALL_BATCHING))
    out = small_batches.embed(table)
    assert out.column("embedding").equals(job.column("embedding"))
    # The check can fail: windows cut among the non-null rows only give some rows other bits.
    present = [t for t in texts if t is not None]
    assert not np.array_equal(embedding_matrix(out.column("embedding")), small_batches.encode(present)), \
        "window edges no longer show in the bits"


@pytest.mark.parametrize("make", [tuple, np.array, iter, pa.array, lambda t: pa.chunked_array([t[:3], t[3:]])],
                         ids=["tuple", "numpy", "iterator", "pyarrow", "chunked"])
def test_encode_takes_any_sequence_of_str(make, default_embedder):
    assert np.array_equal(default_embedder.encode(make(TEXTS)), default_embedder.encode(list(TEXTS)))


def test_encode_nothing_gives_no_rows(default_embedder):
    empty = default_embedder.encode([])
    assert empty.shape == (0, DIM) and empty.dtype == np.float32


@pytest.mark.parametrize("bad", [None, 3, b"bytes"], ids=["None", "int", "bytes"])
def test_encode_names_the_element_that_is_not_a_string(bad, default_embedder):
    with pytest.raises(TypeError, match=rf"^texts\[2\] is {type(bad).__name__}, not str$"):
        default_embedder.encode(["a", "b", bad, "d"])


def test_encode_refuses_a_single_string(default_embedder):
    with pytest.raises(TypeError, match="single str"):
        default_embedder.encode("one text")


@pytest.mark.parametrize("encode", [
    lambda c: c,
    lambda c: c.cast(pa.large_string()),
    lambda c: c.cast(pa.string_view()),
    lambda c: c.dictionary_encode(),
], ids=["string", "large_string", "string_view", "dictionary"])
def test_embed_arrow_keeps_every_column_and_row(encode, default_embedder):
    texts = with_nulls(TEXTS)
    tags = [f"t{i}" for i in range(len(texts))]
    table = pa.table({"id": range(len(texts)), "text": encode(pa.array(texts)), "tag": tags})
    out = default_embedder.embed(table)

    assert isinstance(out, pa.Table) and out.column_names == ["id", "text", "tag", "embedding"]
    assert out.drop_columns(["embedding"]).equals(table)
    embedding = out.column("embedding")
    assert embedding.type == pa.list_(pa.float32(), DIM)
    assert embedding.is_null().to_pylist() == [t is None for t in texts]
    present = [t for t in texts if t is not None]
    assert np.array_equal(embedding_matrix(embedding), default_embedder.encode(present))


@pytest.mark.parametrize("dtype", ["String", "Categorical"])
def test_embed_polars_gives_polars(dtype, default_embedder):
    import polars as pl

    texts = with_nulls(TEXTS)
    frame = pl.DataFrame({"id": range(len(texts)), "text": pl.Series(texts, dtype=getattr(pl, dtype))})
    out = default_embedder.embed(frame, text_col="text")

    assert isinstance(out, pl.DataFrame) and out.columns == ["id", "text", "embedding"]
    assert out.schema["embedding"] == pl.Array(pl.Float32, DIM)
    assert out.drop("embedding").equals(frame)
    assert out.get_column("embedding").is_null().to_list() == [t is None for t in texts]
    present = [t for t in texts if t is not None]
    assert np.array_equal(embedding_matrix(out.get_column("embedding")), default_embedder.encode(present))


def test_embed_refuses_tables_it_cannot_embed(default_embedder):
    import polars as pl

    with pytest.raises(InputError, match="column 'text' not found; columns are: id, body"):
        default_embedder.embed(pa.table({"id": [1], "body": ["b"]}))
    with pytest.raises(InputError, match="column 'text' not found; columns are: id, body"):
        default_embedder.embed(pl.DataFrame({"id": [1], "body": ["b"]}))
    with pytest.raises(InputError, match="column 'id' is int64, not a string"):
        default_embedder.embed(pa.table({"id": [1], "text": ["a"]}), text_col="id")
    with pytest.raises(UsageError, match="already has a column 'embedding'"):
        default_embedder.embed(pa.table({"text": ["a"], "embedding": [1.0]}))
    with pytest.raises(TypeError, match="pass a pyarrow.Table or a polars.DataFrame"):
        default_embedder.embed({"text": ["a"]})


def test_a_device_the_precision_cannot_use_is_refused_before_export(tmp_path):
    with pytest.raises(UsageError, match="runs on the CPU provider only"):
        Embedder(device="cuda", precision="int8", cache_dir=tmp_path)
    with pytest.raises(UnsupportedModelError, match="unknown pooling 'median'"):
        Embedder(pooling="median", device="cpu", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was exported


def test_embed_parquet_runs_the_job(default_embedder, tmp_path, export_cache_dir):
    source, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    texts = with_nulls(JOB_TEXTS)
    pq.write_table(pa.table({"id": range(len(texts)), "source": ["s"] * len(texts), "text": texts}), source)

    metrics = embed_parquet(source, out, keep_cols="id", device="cpu", cache_dir=export_cache_dir,
                            metrics_out=tmp_path / "metrics.json")

    assert metrics["rows"] == metrics["output_rows"] == len(texts) and metrics["output"] == str(out)
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"] == len(texts)
    table = pq.read_table(out)
    assert table.column_names == ["id", "text_key", "embedding"]
    assert table.column("id").to_pylist() == list(range(len(texts)))
    # Default options on both sides: the file holds exactly what the Embedder gives.
    present = [t for t in texts if t is not None]
    assert np.array_equal(embedding_matrix(table.column("embedding")), default_embedder.encode(present))


def test_embed_parquet_raises_what_the_command_exits_with(tmp_path, export_cache_dir):
    out = tmp_path / "out.parquet"
    with pytest.raises(InputError, match="does not exist") as missing:
        embed_parquet(tmp_path / "missing.parquet", out, device="cpu", cache_dir=export_cache_dir)
    assert missing.value.exit_code == 2 and not out.exists()

    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a"]}), source)
    with pytest.raises(UsageError, match="--shard 2/2: need 0 <= I < N"):
        embed_parquet(source, out, shard=(2, 2), device="cpu", cache_dir=export_cache_dir)
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError) as exists:
        embed_parquet(source, out, device="cpu", cache_dir=export_cache_dir)
    assert exists.value.exit_code == 2 and out.read_bytes() == b"keep me"


def test_import_embedder_is_cheap():
    code = ("import sys, json, embedder; loaded = lambda: sorted(m for m in ('polars', 'torch', 'transformers', "
            "'pyarrow', 'onnxruntime') if m in sys.modules); first = loaded(); "
            "from embedder import Embedder, embed_parquet; print(json.dumps([first, loaded()]))")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    bare, with_api = json.loads(proc.stdout)
    assert bare == []
    assert "polars" not in with_api and "torch" not in with_api and "transformers" not in with_api


def test_every_public_name_resolves():
    assert {"Embedder", "embed_parquet", "EmbedderError", "Pooling", "__version__"} <= set(embedder.__all__)
    for name in embedder.__all__:
        assert getattr(embedder, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        embedder.nothing  # noqa: B018
