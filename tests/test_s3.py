"""Buckets with the guarantees of a local disk, against a real S3-compatible server (moto's, on 127.0.0.1).

The job runs in subprocesses with the real client stack (boto3, pyarrow's S3 filesystem) pointed at the
server through AWS_ENDPOINT_URL, as a user points it at MinIO or R2.
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

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import fault_env
from s3_server import moto_server
from test_job import make_corpus

from embedder.io.s3_store import S3Store
from embedder.io.workfolder import WorkFolder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

WINDOW = 100
BUCKET = "corpus-bucket"


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """The server, and this process pointed at it too (for the store-level tests and the checks)."""
    with moto_server(tmp_path_factory.mktemp("moto") / "server.log") as env, pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        from embedder.io import s3_store

        s3_store._client.cache_clear()
        S3Store.for_bucket.cache_clear()
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
        s3_store._client.cache_clear()
        S3Store.for_bucket.cache_clear()


@pytest.fixture(scope="module")
def s3():
    return boto3.client("s3")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """600 docstring rows in 3 files with nested names whose byte order differs from a path-component sort:
    'b-x.parquet' sorts before 'b/y.parquet' in bytes ('-' < '/'), after it component by component."""
    made = make_corpus(tmp_path_factory.mktemp("s3-corpus") / "made", rows=600, files=3, row_group_rows=50,
                       null_fraction=0.02)
    root = made.parent / "tree"
    names = ["a.parquet", "b-x.parquet", "b/y.parquet"]
    for source, name in zip(sorted(made.glob("*.parquet")), names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        source.rename(root / name)
    return root


@pytest.fixture(scope="module")
def bucket_corpus(s3_env, s3, corpus) -> str:
    for path in sorted(corpus.rglob("*.parquet")):
        s3.upload_file(str(path), BUCKET, f"corpus/{path.relative_to(corpus).as_posix()}")
    return f"s3://{BUCKET}/corpus/"


@pytest.fixture(scope="module")
def job_args(model_zoo, export_cache_dir, exported) -> list[str]:
    exported("bert")  # export before any subprocess
    return ["--model", model_zoo.model_arg("bert"), "--cache-dir", str(export_cache_dir), "--window-rows",
            str(WINDOW), "--max-tokens", "512", "--progress", "off", "--threads", "1", "--device", "cpu"]


def run_job(args: list[str], env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.embed", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env, **extra}, timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def error_line(run: subprocess.CompletedProcess) -> str:
    """The job's one error line (stderr may hold log lines before it, never a traceback)."""
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("jobs.embed: error:")]
    assert len(errors) == 1, run.stderr
    return errors[0]


def read_s3_table(s3, key: str) -> pa.Table:
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return pq.read_table(pa.BufferReader(body))


def keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]


def open_uploads(s3) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]


@pytest.fixture(scope="module")
def reference(job_args, corpus, s3_env, tmp_path_factory) -> pa.Table:
    out = tmp_path_factory.mktemp("s3-reference") / "vecs.parquet"
    done = run_job([*job_args, "--in", str(corpus), "--out", str(out)], s3_env)
    assert done.returncode == 0, done.stderr
    return pq.read_table(out)


def test_a_local_folder_is_read_in_byte_order_of_its_relative_paths(reference, corpus):
    expected = pa.concat_tables(pq.read_table(corpus / name).select(["id"])
                                for name in ("a.parquet", "b-x.parquet", "b/y.parquet"))
    assert reference.column("id").equals(expected.column("id"))


@pytest.mark.parametrize("out_key", ["out/vecs.parquet", "out/folder/"], ids=["file", "folder"])
def test_a_bucket_run_equals_the_local_run_bit_for_bit(out_key, job_args, bucket_corpus, reference, s3_env, s3):
    done = run_job([*job_args, "--in", bucket_corpus, "--out", f"s3://{BUCKET}/{out_key}"], s3_env)
    assert done.returncode == 0, done.stderr
    assert last_json(done.stdout)["output_rows"] == reference.num_rows
    if out_key.endswith("/"):
        names = keys(s3, out_key)
        parts = sorted(k for k in names if k.rsplit("/", 1)[1].startswith("part-"))
        assert f"{out_key}_SUCCESS" in names and len(names) == 7 and len(parts) == 6  # 600 rows, windows of 100
        table = pa.concat_tables(read_s3_table(s3, k) for k in parts)
    else:
        table = read_s3_table(s3, out_key)
    assert table.equals(reference)
    assert table.schema.metadata == reference.schema.metadata
    assert not keys(s3, "out/.")  # no work prefix left beside OUT
    assert not open_uploads(s3)


def test_a_glob_in_a_bucket_selects_files_like_a_local_glob(job_args, bucket_corpus, reference, s3_env, s3, tmp_path):
    out = tmp_path / "glob.parquet"
    done = run_job([*job_args, "--in", f"s3://{BUCKET}/corpus/b*.parquet", "--out", str(out)], s3_env)
    assert done.returncode == 0, done.stderr
    ids = pq.read_table(out).column("id").to_pylist()
    assert ids == reference.column("id").to_pylist()[200:400]  # b-x.parquet only: * stops at '/'


@pytest.mark.parametrize("crash_at", ["window:2", "merge:3"], ids=["after-commit", "final-write"])
def test_kill_9_on_a_bucket_then_rerun_resumes_bit_identical(crash_at, job_args, bucket_corpus, reference, s3_env, s3,
                                                             tmp_path):
    out = f"s3://{BUCKET}/killed-{crash_at.split(':')[0]}/vecs.parquet"
    point, count = crash_at.split(":")
    args = [*job_args, "--in", bucket_corpus, "--out", out]
    killed = run_job(args, s3_env, **fault_env(tmp_path / "fault.json", point=point, count=int(count)))
    assert killed.returncode == -signal.SIGKILL
    prefix = out.removeprefix(f"s3://{BUCKET}/").rsplit("/", 1)[0] + "/"
    assert keys(s3, prefix + "vecs.parquet") == []  # OUT is not there, not even in part
    work = keys(s3, prefix + ".vecs.parquet.work/")
    assert any(k.endswith("/_lease") for k in work) and any("/part-" in k for k in work)

    resumed = run_job(args, s3_env)  # the dead job's lease is taken over at once: same host, process gone
    assert resumed.returncode == 0, resumed.stderr
    metrics = last_json(resumed.stdout)
    assert metrics["resumed_rows"] > 0
    assert read_s3_table(s3, prefix + "vecs.parquet").equals(reference)
    assert keys(s3, prefix) == [prefix + "vecs.parquet"]
    assert "took over the lease" in resumed.stderr


def test_a_second_job_on_the_same_bucket_output_fails_at_once(job_args, bucket_corpus, s3_env, s3):
    out = f"s3://{BUCKET}/locked/vecs.parquet"
    with WorkFolder(out).locked():
        started = time.monotonic()
        second = run_job([*job_args, "--in", bucket_corpus, "--out", out], s3_env)
        assert second.returncode == 1
        assert f"another job is writing {out}" in error_line(second)
        assert time.monotonic() - started < 60
    assert keys(s3, "locked/") == []  # the holder released its lease; nothing else was written


def test_a_live_lease_of_another_host_blocks_until_it_expires_and_restart_takes_it_over(job_args, bucket_corpus,
                                                                                          s3_env, s3):
    out = f"s3://{BUCKET}/foreign/vecs.parquet"
    lease = {"id": "other", "host": f"not-{socket.gethostname()}", "pid": 1, "expires": time.time() + 3600}
    s3.put_object(Bucket=BUCKET, Key="foreign/.vecs.parquet.work/_lease", Body=json.dumps(lease).encode())
    blocked = run_job([*job_args, "--in", bucket_corpus, "--out", out], s3_env)
    assert blocked.returncode == 1 and "pass --restart to take it over" in error_line(blocked)

    lease["expires"] = time.time() - 1  # the other host's job died a lease ago
    s3.put_object(Bucket=BUCKET, Key="foreign/.vecs.parquet.work/_lease", Body=json.dumps(lease).encode())
    expired = run_job([*job_args, "--in", bucket_corpus, "--out", out], s3_env)
    assert expired.returncode == 0, expired.stderr

    lease["expires"] = time.time() + 3600
    s3.put_object(Bucket=BUCKET, Key="foreign/.vecs.parquet.work/_lease", Body=json.dumps(lease).encode())
    restarted = run_job([*job_args, "--in", bucket_corpus, "--out", out, "--overwrite", "--restart"], s3_env)
    assert restarted.returncode == 0, restarted.stderr
    assert keys(s3, "foreign/") == ["foreign/vecs.parquet"]


def test_an_input_rewritten_between_crash_and_rerun_is_refused(job_args, corpus, s3_env, s3, tmp_path):
    for path in sorted(corpus.rglob("*.parquet")):
        s3.upload_file(str(path), BUCKET, f"changing/{path.relative_to(corpus).as_posix()}")
    out = f"s3://{BUCKET}/changed/vecs.parquet"
    args = [*job_args, "--in", f"s3://{BUCKET}/changing/", "--out", out]
    killed = run_job(args, s3_env, **fault_env(tmp_path / "fault.json", point="window", count=2))
    assert killed.returncode == -signal.SIGKILL
    table = pq.read_table(corpus / "a.parquet")
    edited = table.set_column(table.schema.get_field_index("text"), "text",
                              pa.array(["edited"] * table.num_rows, table.schema.field("text").type))
    sink = pa.BufferOutputStream()
    pq.write_table(edited, sink)
    s3.put_object(Bucket=BUCKET, Key="changing/a.parquet", Body=sink.getvalue().to_pybytes())  # same size class, new ETag

    rerun = run_job(args, s3_env)
    assert rerun.returncode == 2
    assert "different inputs" in error_line(rerun)


def test_uploads_left_open_by_a_killed_job_are_aborted_on_resume(job_args, bucket_corpus, s3_env, s3, tmp_path):
    out = f"s3://{BUCKET}/stray/vecs.parquet"
    args = [*job_args, "--in", bucket_corpus, "--out", out]
    killed = run_job(args, s3_env, **fault_env(tmp_path / "fault.json", point="window", count=1))
    assert killed.returncode == -signal.SIGKILL
    # What kill -9 leaves mid-way through a large part or the final OUT: multipart uploads never completed.
    for key in ("stray/.vecs.parquet.work/part-000001.parquet", "stray/vecs.parquet"):
        upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)
        s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    assert len(open_uploads(s3)) == 2
    resumed = run_job(args, s3_env)
    assert resumed.returncode == 0, resumed.stderr
    assert open_uploads(s3) == []


@pytest.mark.parametrize(("spec", "fragment"), [
    ("s3://no-such-bucket-here/corpus/", "bucket no-such-bucket-here does not exist"),
    (f"s3://{BUCKET}/no/such/key.parquet", f"input s3://{BUCKET}/no/such/key.parquet does not exist"),
    (f"s3://{BUCKET}/corpus/*.csv", "matches no files"),
    ("gs://some-bucket/corpus/", "Google Cloud Storage is not supported yet"),
], ids=["missing-bucket", "missing-key", "empty-glob", "gcs"])
def test_missing_input_in_a_bucket_is_one_line_and_exit_2(spec, fragment, job_args, bucket_corpus, s3_env, tmp_path):
    run = run_job([*job_args, "--in", spec, "--out", str(tmp_path / "x.parquet")], s3_env)
    assert run.returncode == 2
    assert fragment in error_line(run)
    assert not list(tmp_path.iterdir())


def test_an_existing_bucket_output_is_refused_and_a_missing_output_bucket_is_exit_2(job_args, bucket_corpus, s3_env,
                                                                                     s3):
    s3.put_object(Bucket=BUCKET, Key="exists/vecs.parquet", Body=b"not ours")
    refused = run_job([*job_args, "--in", bucket_corpus, "--out", f"s3://{BUCKET}/exists/vecs.parquet"], s3_env)
    assert refused.returncode == 2 and "exists; pass --overwrite" in error_line(refused)
    assert s3.get_object(Bucket=BUCKET, Key="exists/vecs.parquet")["Body"].read() == b"not ours"
    missing = run_job([*job_args, "--in", bucket_corpus, "--out", "s3://no-such-out-bucket/vecs.parquet"], s3_env)
    assert missing.returncode == 2 and "bucket no-such-out-bucket does not exist" in error_line(missing)


def test_wrong_credentials_are_one_line_and_exit_2(job_args, tmp_path):
    with moto_server(tmp_path / "auth.log", auth=True) as env:
        run = run_job([*job_args, "--in", f"s3://{BUCKET}/corpus/", "--out", str(tmp_path / "x.parquet")],
                      {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-do-not-print"})
    assert run.returncode == 2
    line = error_line(run)
    assert f"access to bucket {BUCKET} denied" in line
    assert "wrong-secret-do-not-print" not in run.stderr + run.stdout


def test_a_bucket_uri_without_the_s3_extra_names_the_pip_command(job_args, tmp_path):
    # boto3 made unimportable, as in an install without the [s3] extra.
    code = ("import sys; sys.modules['boto3'] = None; from jobs.embed import main; "
            f"sys.exit(main({[*job_args, '--in', 's3://bucket-x/corpus/', '--out', str(tmp_path / 'x.parquet')]!r}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "pip install 'embedder[s3]'" in error_line(run)


def test_the_upload_stream_publishes_whole_or_nothing(s3_env, s3):
    store = S3Store.for_bucket(BUCKET)
    chunk = os.urandom(1 << 20)
    with store.writer(f"{BUCKET}/stream/big.bin") as sink:  # 20 MiB: a multipart upload of three parts
        for _ in range(20):
            sink.write(chunk)
        assert keys(s3, "stream/") == []  # nothing visible before the end
    assert s3.get_object(Bucket=BUCKET, Key="stream/big.bin")["Body"].read() == chunk * 20

    with pytest.raises(RuntimeError), store.writer(f"{BUCKET}/stream/failed.bin") as sink:
        for _ in range(20):
            sink.write(chunk)
        raise RuntimeError("the writer failed half-way")
    assert keys(s3, "stream/failed") == [] and open_uploads(s3) == []


def test_embed_parquet_takes_bucket_uris(model_zoo, export_cache_dir, bucket_corpus, reference, s3_env, s3):
    from embedder import embed_parquet

    metrics = embed_parquet(bucket_corpus, f"s3://{BUCKET}/api/", model=model_zoo.model_arg("bert"),
                            cache_dir=export_cache_dir, window_rows=WINDOW, max_tokens=512, threads=1, device="cpu")
    assert metrics["output_rows"] == reference.num_rows
    parts = sorted(k for k in keys(s3, "api/") if "/part-" in k)
    assert pa.concat_tables(read_s3_table(s3, k) for k in parts).equals(reference)
