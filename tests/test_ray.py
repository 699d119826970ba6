"""jobs.embed_ray on a local Ray with 2 CPUs: equal to the single-process job, complete after a killed actor,
and the same from a bucket to a bucket (S3, Azure and GCS servers on 127.0.0.1, tests/buckets.py).

Select these with `-m ray` (or leave them out with `-m "not ray"`); they need the `ray` extra. The
tests that need no Ray (bad input fails before Ray starts, the single-process job never imports
Ray) are not marked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import fault_env
from buckets import started
from test_job import make_corpus

from jobs.embed import main as embed_main
from jobs.embed_ray import main as embed_ray_main

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 100


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory) -> Path:
    """Where a test arms a kill in the Ray workers (tests/fault_site); absent, nothing is armed."""
    return tmp_path_factory.mktemp("ray-fault") / "fault.json"


@pytest.fixture(scope="module")
def buckets(tmp_path_factory):
    """An S3 server (moto), an Azure one (Azurite) and a GCS one (fake-gcs-server), each with a bucket: started before Ray,
    whose workers get their endpoints and credentials when it starts (tests/buckets.py)."""
    with contextlib.ExitStack() as stack:
        views = {scheme: stack.enter_context(started(scheme, tmp_path_factory.mktemp(f"ray-{scheme}")))[1]
                 for scheme in ("s3", "az", "gs")}
        yield views


@pytest.fixture(scope="module")
def ray_cluster(fault_file, buckets):
    """One local Ray for the module, 2 CPUs as in CI, shut down after; its workers carry the test hook and the
    S3 server's endpoint and credentials (a worker's environment is fixed when Ray starts)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {**fault_env(fault_file), **{k: v for b in buckets.values() for k, v in b.env.items()}}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """600 rows of real docstrings in 3 files (3 row groups each) with nulls; the text column is a plain
    string in the first file, dictionary-encoded in the second and binary in the third."""
    folder = make_corpus(tmp_path_factory.mktemp("ray-corpus") / "parts", rows=600, files=3, row_group_rows=70,
                         null_fraction=0.03)
    parts = sorted(folder.glob("*.parquet"))
    for part, encode in zip(parts[1:], (lambda c: c.dictionary_encode(), lambda c: c.cast(pa.binary()))):
        table = pq.read_table(part)
        table = table.set_column(table.schema.get_field_index("text"), "text", encode(table.column("text")))
        pq.write_table(table, part, row_group_size=70)
    return folder


@pytest.fixture(scope="module")
def job_args(model_zoo, export_cache_dir, exported, corpus) -> list[str]:
    exported("bert")  # export before the jobs, so they time embedding, not the export
    return ["--in", str(corpus), "--model", model_zoo.model_arg("bert"), "--cache-dir", str(export_cache_dir),
            "--window-rows", str(WINDOW), "--max-tokens", "512", "--progress", "off", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference(job_args, tmp_path_factory) -> pa.Table:
    out = tmp_path_factory.mktemp("ray-reference") / "vecs.parquet"
    assert embed_main([*job_args, "--out", str(out), "--threads", "1"]) == 0
    return pq.read_table(out)


RAY_ARGS = ["--workers", "2", "--cpus-per-worker", "0.5"]  # 2 actors, 1 CPU left for Ray Data's read tasks


def run_ray(args: list[str], out: Path | str, metrics: Path) -> dict:
    assert embed_ray_main([*args, *RAY_ARGS, "--out", str(out), "--metrics-out", str(metrics)]) == 0
    return json.loads(metrics.read_text())


def assert_same_rows(table: pa.Table, reference: pa.Table) -> None:
    """Joined on id: the same rows, none lost or doubled, carried columns equal, vectors within cosine 1e-5."""
    ids = table.column("id").to_numpy()
    assert len(np.unique(ids)) == len(ids) == reference.num_rows
    order = np.argsort(ids)
    ref_order = np.argsort(reference.column("id").to_numpy())
    table, reference = table.take(pa.array(order)), reference.take(pa.array(ref_order))
    assert table.drop_columns(["embedding"]).equals(reference.drop_columns(["embedding"]))
    assert_vectors_close(table, reference)


def assert_vectors_close(table: pa.Table, reference: pa.Table) -> None:
    """Rows in the same order: the same null vectors, the others within cosine 1e-5."""
    got, want = table.column("embedding").combine_chunks(), reference.column("embedding").combine_chunks()
    valid = want.is_valid().to_numpy(zero_copy_only=False)
    assert np.array_equal(got.is_valid().to_numpy(zero_copy_only=False), valid)  # null text -> null vector
    dim = want.type.list_size
    a = got.values.to_numpy(zero_copy_only=False).reshape(-1, dim)[valid]
    b = want.values.to_numpy(zero_copy_only=False).reshape(-1, dim)[valid]
    assert float((a * b).sum(axis=1).min()) >= 0.99999


@pytest.mark.ray
@pytest.mark.slow
def test_ray_output_equals_the_single_process_output(ray_cluster, job_args, reference, tmp_path):
    out = tmp_path / "vecs"
    metrics = run_ray(job_args, out, tmp_path / "metrics.json")

    table = pq.read_table(out)
    assert table.schema.equals(reference.schema, check_metadata=True)  # same columns, types and `embedder` metadata
    assert (out / "_SUCCESS").is_file()  # what readers of a bucket's OUT wait for: on disk too
    for part in sorted(out.glob("part-*.parquet")):
        assert pq.read_schema(part).equals(reference.schema, check_metadata=True)
    assert_same_rows(table, reference)
    assert table.column("id").equals(reference.column("id"))  # part files are named in input order
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    assert metrics["rows"] == metrics["output_rows"] == reference.num_rows
    assert metrics["null_rows"] == reference.column("embedding").null_count
    assert metrics["ray"]["graph_transfer"] == "path"
    workers = metrics["workers"]
    assert sum(w["rows"] for w in workers) == reference.num_rows
    assert sum(w["real_tokens"] for w in workers) == metrics["real_tokens"] > 0
    assert all(w["tokens_per_second"] > 0 for w in workers)
    assert metrics["blocks"] >= 6  # 600 rows in blocks of at most WINDOW


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "az", "gs"], ids=["s3", "azure", "gcs"])
def test_a_bucket_in_and_a_bucket_out_equal_the_single_process_output(scheme, ray_cluster, buckets, job_args, corpus,
                                                                      reference, tmp_path):
    """Ray Data reads the bucket's corpus through pyarrow's filesystem for the store; the actors stage their parts
    in the bucket; OUT is published by server-side copies with _SUCCESS last, and nothing else is left there."""
    bucket = buckets[scheme]
    prefix = f"ray-{scheme}/"
    for path in sorted(corpus.glob("*.parquet")):
        bucket.put(f"{prefix}corpus/{path.name}", path.read_bytes())
    args = [bucket.uri(f"{prefix}corpus/") if arg == str(corpus) else arg for arg in job_args]
    metrics = run_ray(args, bucket.uri(f"{prefix}out/"), tmp_path / "metrics.json")

    parts = [f"{prefix}out/part-{i:06d}.parquet" for i in range(metrics["blocks"])]
    assert bucket.keys(f"{prefix}out/") == sorted([f"{prefix}out/_SUCCESS", *parts])
    assert bucket.keys(prefix) == sorted([*bucket.keys(f"{prefix}out/"), *bucket.keys(f"{prefix}corpus/")])  # no staging
    assert bucket.open_uploads() == []
    table = pa.concat_tables(pq.read_table(pa.BufferReader(bucket.get(key))) for key in parts)

    assert table.schema.equals(reference.schema, check_metadata=True)
    assert table.drop_columns(["embedding"]).equals(reference.drop_columns(["embedding"]))  # input order, same rows
    got, want = table.column("embedding").combine_chunks(), reference.column("embedding").combine_chunks()
    valid = want.is_valid().to_numpy(zero_copy_only=False)
    assert np.array_equal(got.is_valid().to_numpy(zero_copy_only=False), valid)  # null text -> null vector
    dim = want.type.list_size
    difference = np.abs(got.values.to_numpy(zero_copy_only=False).reshape(-1, dim)[valid]
                        - want.values.to_numpy(zero_copy_only=False).reshape(-1, dim)[valid])
    assert float(difference.max()) <= 1e-6, float(difference.max())
    assert metrics["rows"] == metrics["output_rows"] == reference.num_rows


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("point", ["embedded", "written"])
def test_an_actor_killed_mid_run_is_retried_and_nothing_is_lost_or_doubled(point, ray_cluster, fault_file, job_args,
                                                                          reference, tmp_path, caplog):
    """SIGKILL in one actor, once, after embedding a window or after committing its part file; the graph
    reaches the restarted actor through the object store."""
    caplog.set_level(logging.INFO, logger="embedder.run.ray_driver")
    marker = tmp_path / "crashed"
    fault_env(fault_file, point=point, once=str(marker))
    out = tmp_path / "vecs"
    try:
        metrics = run_ray([*job_args, "--graph-transfer", "object-store"], out, tmp_path / "metrics.json")
    finally:
        fault_file.unlink()

    assert marker.exists()  # an actor really died
    assert metrics["ray"]["graph_transfer"] == "object-store"
    assert_same_rows(pq.read_table(out), reference)
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", *(f"part-{i:06d}.parquet" for i in range(metrics["blocks"]))]
    assert metrics["rows"] == reference.num_rows
    # What the dead attempt left (a half-written or a complete part file) was deleted, not kept twice.
    assert "left by a failed attempt" in caplog.text


@pytest.mark.ray
@pytest.mark.slow
def test_index_ready_output_equals_the_single_process_output(ray_cluster, job_args, tmp_path):
    """int8 with a template and token counts: the driver calibrates on the first window before any block goes
    out, so every part file records, and quantizes with, the ranges jobs.embed takes from its first window."""
    flags = ["--output-dtype", "int8", "--truncate-dim", "12", "--with-token-counts", "--text-template",
             "{source}: {text}", "--threads", "1"]
    local = tmp_path / "local.parquet"
    assert embed_main([*job_args, *flags, "--out", str(local)]) == 0
    reference = pq.read_table(local)
    out = tmp_path / "vecs"
    run_ray([*job_args, *flags], out, tmp_path / "metrics.json")

    table = pq.read_table(out)
    assert table.schema.equals(reference.schema, check_metadata=True)  # the same ranges in every part file
    assert json.loads(table.schema.metadata[b"embedder"])["calibration"].startswith("the first window")
    table = table.take(pa.array(np.argsort(table.column("id").to_numpy())))
    assert table.drop_columns(["embedding"]).equals(reference.drop_columns(["embedding"]))  # ids, tokens, truncated
    got, want = (pa.Table.from_batches(t.to_batches()).column("embedding").combine_chunks() for t in (table, reference))
    assert got.is_null().equals(want.is_null())
    # Blocks are not always cut where windows are, and batching shapes the last bits: a value may move one step.
    steps = np.abs(got.values.to_numpy(zero_copy_only=False).astype(int) - want.values.to_numpy(zero_copy_only=False))
    assert steps.max() <= 1 and (steps == 0).mean() > 0.99


@pytest.mark.ray
@pytest.mark.slow
def test_chunked_output_equals_the_single_process_output(ray_cluster, job_args, tmp_path):
    """--chunk on Ray: a row per chunk, the same chunks and offsets as jobs.embed, vectors within cosine 1e-5."""
    flags = ["--chunk", "--chunk-overlap", "4", "--threads", "1"]
    local = tmp_path / "local.parquet"
    assert embed_main([*job_args, *flags, "--out", str(local)]) == 0
    reference = pq.read_table(local)
    out = tmp_path / "vecs"
    metrics = run_ray([*job_args, *flags], out, tmp_path / "metrics.json")

    table = pq.read_table(out)
    assert table.schema.equals(reference.schema, check_metadata=True)
    order = np.lexsort((table.column("chunk").fill_null(0).to_numpy(), table.column("id").to_numpy()))
    table = table.take(pa.array(order))
    assert table.drop_columns(["embedding"]).equals(reference.drop_columns(["embedding"]))
    assert metrics["output_rows"] == reference.num_rows > metrics["rows"]  # more chunks than rows
    assert metrics["chunks"] == len(reference.column("chunk").drop_null()) and metrics["chunked_rows"] > 0
    assert_vectors_close(table, reference)


@pytest.mark.ray
@pytest.mark.slow
def test_reuse_on_ray_takes_the_previous_vectors(ray_cluster, job_args, reference, tmp_path):
    """--reuse of the single-process output: every row is found, none embedded, the vectors are PREV's."""
    prev = tmp_path / "prev.parquet"
    assert embed_main([*job_args, "--out", str(prev), "--threads", "1"]) == 0
    out = tmp_path / "vecs"
    metrics = run_ray([*job_args, "--reuse", str(prev)], out, tmp_path / "metrics.json")
    assert metrics["reused_rows"] == metrics["rows"] - metrics["null_rows"] > 0 and metrics["real_tokens"] == 0
    table = pq.read_table(out)
    table = table.take(pa.array(np.argsort(table.column("id").to_numpy())))
    assert table.equals(pq.read_table(prev).cast(table.schema))


@pytest.mark.ray
@pytest.mark.slow
def test_bad_utf8_text_fails_with_one_line_and_exit_2(ray_cluster, model_zoo, export_cache_dir, exported, tmp_path,
                                                      capsys):
    exported("bert")
    source = tmp_path / "in.parquet"
    texts = pa.array([b"fine", b"bad \xff byte", None], pa.binary()).view(pa.string())  # unchecked string pages
    pq.write_table(pa.table({"id": [1, 2, 3], "text": texts}), source)
    out = tmp_path / "vecs"
    code = embed_ray_main(["--in", str(source), "--out", str(out), "--model", model_zoo.model_arg("bert"),
                           "--cache-dir", str(export_cache_dir), "--progress", "off", *RAY_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert "not valid UTF-8" in err[-1] and "id=2" in err[-1] and err[-1].startswith("jobs.embed_ray: error:")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.ray
def test_an_empty_input_writes_one_empty_part_with_the_schema(model_zoo, export_cache_dir, exported, reference,
                                                                tmp_path):
    """No rows: Ray is not even asked; OUT still holds a part that carries the schema and metadata."""
    pytest.importorskip("ray.data")
    exported("bert")
    source = tmp_path / "in.parquet"
    pq.write_table(reference.drop_columns(["text_key", "embedding"]).slice(0, 0).append_column(
        "text", pa.array([], pa.string())), source)
    out = tmp_path / "vecs"
    assert embed_ray_main(["--in", str(source), "--out", f"{out}/", "--model", model_zoo.model_arg("bert"),
                           "--cache-dir", str(export_cache_dir), "--progress", "off", *RAY_ARGS]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "part-000000.parquet"]
    table = pq.read_table(out / "part-000000.parquet")
    assert table.num_rows == 0 and table.schema.equals(reference.schema, check_metadata=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_input_and_an_existing_output_fail_before_ray_starts(corpus, tmp_path, capsys):
    out = tmp_path / "vecs"
    assert embed_ray_main(["--in", str(corpus), "--out", str(out), "--text-col", "body"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jobs.embed_ray: error:") and "column 'body' not found" in err and "\n" not in err
    out.mkdir()
    assert embed_ray_main(["--in", str(corpus), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert embed_ray_main(["--in", str(corpus), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    # fp16 graphs run on CUDA only: actors without GPUs could not run them.
    assert embed_ray_main(["--in", str(corpus), "--out", str(tmp_path / "o"), "--precision", "fp16"]) == 2
    assert "fp16 runs on CUDA only; give the actors GPUs with --gpus-per-worker" in capsys.readouterr().err
    assert embed_ray_main(["--in", str(corpus), "--out", str(tmp_path / "o"), "--precision", "int8",
                           "--gpus-per-worker", "1"]) == 2
    assert "int8 runs on the CPU provider only; drop --gpus-per-worker" in capsys.readouterr().err


def test_the_single_process_job_does_not_import_ray():
    code = "import sys, embedder, embedder.run.local, jobs.embed; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_cli_offers_the_graph_transfers_the_driver_knows():
    from embedder.run.ray_driver import GRAPH_TRANSFERS
    from jobs.embed_ray import GRAPH_TRANSFERS as offered

    assert offered == GRAPH_TRANSFERS


def test_device_follows_the_gpus_ray_hands_out():
    from embedder.errors import UsageError
    from embedder.run.ray_driver import actor_device

    assert actor_device("auto", 0) == "cpu"
    assert actor_device("auto", 1) == "cuda"  # asked for GPUs: no silent CPU run
    assert actor_device("cuda:0", 0.5) == "cuda:0"
    for device, gpus in (("cuda", 0), ("cpu", 1)):
        with pytest.raises(UsageError):
            actor_device(device, gpus)


def test_a_worker_error_known_only_from_its_traceback_text_keeps_its_class():
    from embedder.errors import EmbedderError, InputError
    from embedder.run.ray_driver import _explain

    wrapped = RuntimeError("ray::MapWorker failed\nTraceback (most recent call last):\n  ...\n"
                           "embedder.errors.InputError: column 'text' holds bytes that are not valid UTF-8")
    error = _explain(wrapped)
    assert type(error) is InputError and str(error).startswith("column 'text'")
    other = _explain(RuntimeError("node died\nmore"))
    assert type(other) is EmbedderError and str(other) == "the Ray job failed: RuntimeError: node died"


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_stops_the_ray_driver_with_no_output_and_nothing_left(job_args, tmp_path):
    """The shared signal handling on the Ray path: exit 143, one line, no OUT, no staging folder, Ray shut down."""
    import os
    import signal
    import time

    out = tmp_path / "vecs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the job starts its own local Ray
    proc = subprocess.Popen([sys.executable, "-m", "jobs.embed_ray", *job_args, *RAY_ARGS, "--out", str(out),
                             "--max-batch-size", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 180
    staged = []
    while not staged and proc.poll() is None and time.monotonic() < deadline:
        staged = [p for folder in tmp_path.glob(".vecs.ray-*.tmp") for p in folder.iterdir()]  # an actor wrote
        time.sleep(0.05)
    assert staged, "no actor wrote a part before the deadline"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    # Ray's own processes may still log to this stderr while they stop; the job's part is one line.
    [ours] = [line for line in stderr.splitlines() if line.startswith("jobs.embed_ray: error:")]
    assert ours.startswith("jobs.embed_ray: error: stopped by SIGTERM") and "OUT was not written" in ours
    assert f'File "{ROOT / "embedder"}' not in stderr  # no traceback through the job's code
    assert not out.exists() and not list(tmp_path.glob(".vecs*"))
