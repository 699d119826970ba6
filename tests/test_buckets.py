"""Buckets with the guarantees of a local disk, against real servers on 127.0.0.1: moto's S3, Azurite, fake-gcs-server.

The job runs in subprocesses with the real client stacks (boto3 and pyarrow's S3 filesystem; azure-storage-blob;
google-cloud-storage) pointed at the servers as a user points them at MinIO, R2 or an emulator:
AWS_ENDPOINT_URL, AZURE_STORAGE_CONNECTION_STRING, STORAGE_EMULATOR_HOST. Every test runs on every store
(tests/buckets.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from buckets import NAME, started
from faults import fault_env
from test_job import make_corpus

from embedder.io.store import locate
from embedder.io.workfolder import WorkFolder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

WINDOW = 100


@pytest.fixture(scope="module", params=["s3", "az", "gs"], ids=["s3", "azure", "gcs"])
def bucket(request, tmp_path_factory):
    """A server of each kind with a bucket (container) in it; this process is pointed at it too."""
    with started(request.param, tmp_path_factory.mktemp(f"server-{request.param}")) as (_env, view):
        yield view


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """600 docstring rows in 3 files with nested names whose byte order differs from a path-component sort:
    'b-x.parquet' sorts before 'b/y.parquet' in bytes ('-' < '/'), after it component by component."""
    made = make_corpus(tmp_path_factory.mktemp("bucket-corpus") / "made", rows=600, files=3, row_group_rows=50,
                       null_fraction=0.02)
    root = made.parent / "tree"
    for source, name in zip(sorted(made.glob("*.parquet")), ["a.parquet", "b-x.parquet", "b/y.parquet"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        source.rename(root / name)
    return root


def upload(bucket, corpus: Path, prefix: str) -> str:
    for path in sorted(corpus.rglob("*.parquet")):
        bucket.put(f"{prefix}{path.relative_to(corpus).as_posix()}", path.read_bytes())
    return bucket.uri(prefix)


@pytest.fixture(scope="module")
def bucket_corpus(bucket, corpus) -> str:
    return upload(bucket, corpus, "corpus/")


@pytest.fixture(scope="module")
def job_args(model_zoo, export_cache_dir, exported) -> list[str]:
    exported("bert")  # export before any subprocess
    return ["--model", model_zoo.model_arg("bert"), "--cache-dir", str(export_cache_dir), "--window-rows",
            str(WINDOW), "--max-tokens", "512", "--progress", "off", "--threads", "1", "--device", "cpu"]


def run_job(args: list[str], env: dict | None = None, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.embed", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {}), **extra}, timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def error_line(run: subprocess.CompletedProcess) -> str:
    """The job's one error line (stderr may hold log lines before it, never a traceback)."""
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("jobs.embed: error:")]
    assert len(errors) == 1, run.stderr
    return errors[0]


def read_table(bucket, key: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(bucket.get(key)))


@pytest.fixture(scope="module")
def reference(job_args, corpus, tmp_path_factory) -> pa.Table:
    out = tmp_path_factory.mktemp("bucket-reference") / "vecs.parquet"
    done = run_job([*job_args, "--in", str(corpus), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    return pq.read_table(out)


def test_a_local_folder_is_read_in_byte_order_of_its_relative_paths(reference, corpus):
    expected = pa.concat_tables(pq.read_table(corpus / name).select(["id"])
                                for name in ("a.parquet", "b-x.parquet", "b/y.parquet"))
    assert reference.column("id").equals(expected.column("id"))


@pytest.mark.parametrize("out_key", ["out/vecs.parquet", "out/folder/"], ids=["file", "folder"])
def test_a_bucket_run_equals_the_local_run_bit_for_bit(out_key, job_args, bucket, bucket_corpus, reference):
    done = run_job([*job_args, "--in", bucket_corpus, "--out", bucket.uri(out_key)])
    assert done.returncode == 0, done.stderr
    assert last_json(done.stdout)["output_rows"] == reference.num_rows
    if out_key.endswith("/"):
        names = bucket.keys(out_key)
        parts = [k for k in names if k.rsplit("/", 1)[1].startswith("part-")]
        assert f"{out_key}_SUCCESS" in names and len(names) == 7 and len(parts) == 6  # 600 rows, windows of 100
        table = pa.concat_tables(read_table(bucket, k) for k in parts)
    else:
        table = read_table(bucket, out_key)
    assert table.equals(reference)
    assert table.schema.metadata == reference.schema.metadata
    assert not bucket.keys("out/.")  # no work prefix left beside OUT
    assert not bucket.open_uploads()


def test_a_glob_in_a_bucket_selects_files_like_a_local_glob(job_args, bucket, bucket_corpus, reference, tmp_path):
    out = tmp_path / "glob.parquet"
    done = run_job([*job_args, "--in", bucket.uri("corpus/b*.parquet"), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    ids = pq.read_table(out).column("id").to_pylist()
    assert ids == reference.column("id").to_pylist()[200:400]  # b-x.parquet only: * stops at '/'


@pytest.mark.parametrize("crash_at", ["window:2", "merge:3"], ids=["after-commit", "final-write"])
def test_kill_9_on_a_bucket_then_rerun_resumes_bit_identical(crash_at, job_args, bucket, bucket_corpus, reference,
                                                             tmp_path):
    prefix = f"killed-{crash_at.split(':')[0]}/"
    args = [*job_args, "--in", bucket_corpus, "--out", bucket.uri(prefix + "vecs.parquet")]
    point, count = crash_at.split(":")
    killed = run_job(args, **fault_env(tmp_path / "fault.json", point=point, count=int(count)))
    assert killed.returncode == -signal.SIGKILL
    assert prefix + "vecs.parquet" not in bucket.keys(prefix)  # OUT is not there, not even in part
    work = bucket.keys(prefix + ".vecs.parquet.work/")
    assert any(k.endswith("/_lease") for k in work) and any("/part-" in k for k in work)

    resumed = run_job(args)  # the dead job's lease is taken over at once: same host, process gone
    assert resumed.returncode == 0, resumed.stderr
    assert last_json(resumed.stdout)["resumed_rows"] > 0
    assert "took over the lease" in resumed.stderr
    assert read_table(bucket, prefix + "vecs.parquet").equals(reference)
    assert bucket.keys(prefix) == [prefix + "vecs.parquet"]


def test_a_second_job_on_the_same_bucket_output_fails_at_once(job_args, bucket, bucket_corpus):
    out = bucket.uri("locked/vecs.parquet")
    with WorkFolder(out).locked():
        started_at = time.monotonic()
        second = run_job([*job_args, "--in", bucket_corpus, "--out", out])
        assert second.returncode == 1
        assert f"another job is writing {out}" in error_line(second)
        assert time.monotonic() - started_at < 60
    assert bucket.keys("locked/") == []  # the holder released its lease; nothing else was written


def test_a_live_lease_of_another_host_blocks_until_it_expires_and_restart_takes_it_over(job_args, bucket,
                                                                                          bucket_corpus):
    out, lease_key = bucket.uri("foreign/vecs.parquet"), "foreign/.vecs.parquet.work/_lease"
    lease = {"id": "other", "host": f"not-{socket.gethostname()}", "pid": 1, "expires": time.time() + 3600}
    bucket.put(lease_key, json.dumps(lease).encode())
    blocked = run_job([*job_args, "--in", bucket_corpus, "--out", out])
    assert blocked.returncode == 1 and "pass --restart to take it over" in error_line(blocked)

    lease["expires"] = time.time() - 1  # the other host's job died a lease ago
    bucket.put(lease_key, json.dumps(lease).encode())
    expired = run_job([*job_args, "--in", bucket_corpus, "--out", out])
    assert expired.returncode == 0, expired.stderr

    lease["expires"] = time.time() + 3600
    bucket.put(lease_key, json.dumps(lease).encode())
    restarted = run_job([*job_args, "--in", bucket_corpus, "--out", out, "--overwrite", "--restart"])
    assert restarted.returncode == 0, restarted.stderr
    assert bucket.keys("foreign/") == ["foreign/vecs.parquet"]


def test_an_input_rewritten_between_crash_and_rerun_is_refused(job_args, bucket, corpus, tmp_path):
    args = [*job_args, "--in", upload(bucket, corpus, "changing/"), "--out", bucket.uri("changed/vecs.parquet")]
    killed = run_job(args, **fault_env(tmp_path / "fault.json", point="window", count=2))
    assert killed.returncode == -signal.SIGKILL
    table = pq.read_table(corpus / "a.parquet")
    edited = table.set_column(table.schema.get_field_index("text"), "text",
                              pa.array(["edited"] * table.num_rows, table.schema.field("text").type))
    sink = pa.BufferOutputStream()
    pq.write_table(edited, sink)
    bucket.put("changing/a.parquet", sink.getvalue().to_pybytes())  # a new ETag

    rerun = run_job(args)
    assert rerun.returncode == 2
    assert "different inputs" in error_line(rerun)


@pytest.mark.parametrize(("spec", "fragment"), [
    ("missing-bucket", "{word} no-such-bucket-here does not exist"),
    ("missing-key", "input {uri} does not exist"),
    ("empty-glob", "matches no files"),
])
def test_missing_input_in_a_bucket_is_one_line_and_exit_2(spec, fragment, job_args, bucket, bucket_corpus, tmp_path):
    uri = {"missing-bucket": bucket.uri("corpus/", bucket="no-such-bucket-here"),
           "missing-key": bucket.uri("no/such/key.parquet"), "empty-glob": bucket.uri("corpus/*.csv")}[spec]
    run = run_job([*job_args, "--in", uri, "--out", str(tmp_path / "x.parquet")])
    assert run.returncode == 2
    assert fragment.format(word=bucket.word, uri=uri) in error_line(run)
    assert not list(tmp_path.iterdir())


def test_an_existing_bucket_output_is_refused_and_a_missing_output_bucket_is_exit_2(job_args, bucket, bucket_corpus):
    bucket.put("exists/vecs.parquet", b"not ours")
    refused = run_job([*job_args, "--in", bucket_corpus, "--out", bucket.uri("exists/vecs.parquet")])
    assert refused.returncode == 2 and "exists; pass --overwrite" in error_line(refused)
    assert bucket.get("exists/vecs.parquet") == b"not ours"
    missing = run_job([*job_args, "--in", bucket_corpus, "--out", bucket.uri("vecs.parquet", bucket="no-such-out")])
    assert missing.returncode == 2 and f"{bucket.word} no-such-out does not exist" in error_line(missing)


def test_wrong_credentials_are_one_line_and_exit_2(job_args, bucket, tmp_path):
    with bucket.bad_credentials(tmp_path) as (env, secret):
        run = run_job([*job_args, "--in", bucket.uri("corpus/"), "--out", str(tmp_path / "x.parquet")], env)
    assert run.returncode == 2
    assert bucket.denied.format(name=NAME) in error_line(run)
    assert secret not in run.stderr + run.stdout


def test_a_bucket_uri_without_its_extra_names_the_pip_command(job_args, bucket, tmp_path):
    # The store's client library made unimportable, as in an install without the extra.
    args = [*job_args, "--in", bucket.uri("corpus/"), "--out", str(tmp_path / "x.parquet")]
    code = (f"import sys; sys.modules[{bucket.missing_extra!r}] = None; from jobs.embed import main; "
            f"sys.exit(main({args!r}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert bucket.install_hint in error_line(run)


def test_the_upload_stream_publishes_whole_or_nothing(bucket, monkeypatch):
    from embedder.io import gcs_store

    # GCS composes chunks 32 at a time: with 1 MiB chunks, 40 MiB needs a compose of composes.
    monkeypatch.setattr(gcs_store, "_CHUNK_BYTES", 1 << 20)
    store, path = locate(bucket.uri("stream/big.bin"))
    chunk = os.urandom(1 << 20)
    with store.writer(path) as sink:  # 40 MiB: several parts (S3), blocks (Azure) or composed chunks (GCS)
        for _ in range(40):
            sink.write(chunk)
        assert [k for k in bucket.keys("stream/") if not k.startswith("stream/.")] == []  # nothing visible yet
    assert bucket.get("stream/big.bin") == chunk * 40
    assert bucket.keys("stream/") == ["stream/big.bin"]  # no chunk objects left

    store, path = locate(bucket.uri("stream/failed.bin"))
    with pytest.raises(RuntimeError), store.writer(path) as sink:
        for _ in range(20):
            sink.write(chunk)
        raise RuntimeError("the writer failed half-way")
    assert bucket.keys("stream/") == ["stream/big.bin"] and bucket.open_uploads() == []


def test_embed_parquet_takes_bucket_uris(model_zoo, export_cache_dir, bucket, bucket_corpus, reference):
    from embedder import embed_parquet

    metrics = embed_parquet(bucket_corpus, bucket.uri("api/"), model=model_zoo.model_arg("bert"),
                            cache_dir=export_cache_dir, window_rows=WINDOW, max_tokens=512, threads=1, device="cpu")
    assert metrics["output_rows"] == reference.num_rows
    parts = [k for k in bucket.keys("api/") if "/part-" in k]
    assert pa.concat_tables(read_table(bucket, k) for k in parts).equals(reference)


def test_uploads_left_open_by_a_killed_job_are_cleared_on_resume(job_args, bucket, bucket_corpus, tmp_path):
    args = [*job_args, "--in", bucket_corpus, "--out", bucket.uri("stray/vecs.parquet")]
    killed = run_job(args, **fault_env(tmp_path / "fault.json", point="window", count=1))
    assert killed.returncode == -signal.SIGKILL
    # Killed mid-way through a large part, and through the final OUT.
    stray = ("stray/.vecs.parquet.work/part-000001.parquet", "stray/vecs.parquet")
    for key in stray:
        bucket.leave_open_upload(key)
    assert bucket.open_uploads(stray) == list(stray)
    resumed = run_job(args)
    assert resumed.returncode == 0, resumed.stderr
    assert bucket.open_uploads(stray) == []
    assert read_table(bucket, "stray/vecs.parquet").num_rows == 600


def test_a_whole_bucket_as_out_is_refused_before_any_work(job_args, bucket, bucket_corpus):
    run = run_job([*job_args, "--in", bucket_corpus, "--out", bucket.uri("")])
    assert run.returncode == 2
    assert "not the bucket itself" in error_line(run)
