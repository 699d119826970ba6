"""Surviving cron and Airflow: kill -9 and resume, SIGTERM, sharding, locks (tiny BERT model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import fault_env
from test_job import make_corpus

from embedder.io.workfolder import WorkFolder, part_name
from jobs.embed import main as embed_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

WINDOW = 100


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """1,200 rows of real docstrings in 3 files of 4 row groups each, with some null texts."""
    return make_corpus(tmp_path_factory.mktemp("resume-corpus") / "parts", rows=1200, files=3, row_group_rows=100,
                       null_fraction=0.02)


@pytest.fixture(scope="module")
def job_args(model_zoo, export_cache_dir, exported, corpus) -> list[str]:
    exported("bert")  # export before any subprocess, so the tests time the job, not the export
    return ["--in", str(corpus), "--model", model_zoo.model_arg("bert"), "--cache-dir", str(export_cache_dir),
            "--window-rows", str(WINDOW), "--max-tokens", "512", "--progress", "off", "--threads", "1",
            "--device", "cpu"]


@pytest.fixture(scope="module")
def reference(job_args, tmp_path_factory) -> pa.Table:
    out = tmp_path_factory.mktemp("reference") / "vecs.parquet"
    assert embed_main([*job_args, "--out", str(out)]) == 0
    return pq.read_table(out)


def run_job(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.embed", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def killed_then_resumed(args: list[str], out: Path, fault_file: Path, windows: int) -> dict:
    """Run the job on out, kill -9 it once `windows` windows are committed, rerun it; the rerun's metrics."""
    killed = run_job([*args, "--out", str(out)], **fault_env(fault_file, point="window", count=windows))
    assert killed.returncode == -signal.SIGKILL
    resumed = run_job([*args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    return last_json(resumed.stdout)


@pytest.mark.parametrize("crash_at", ["batch:1", "batch:40", "window:5", "merge:3"],
                         ids=["early", "mid-window", "after-commit", "final-write"])
def test_sigkill_then_rerun_gives_the_uninterrupted_output(crash_at, job_args, reference, tmp_path):
    out = tmp_path / "vecs.parquet"
    point, count = crash_at.split(":")
    killed = run_job([*job_args, "--out", str(out)], **fault_env(tmp_path / "fault.json", point=point, count=int(count)))
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    assert Path(WorkFolder(out).path).is_dir()

    resumed = run_job([*job_args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    metrics = last_json(resumed.stdout)
    if crash_at != "batch:1":
        assert metrics["resumed_rows"] > 0  # committed windows were not redone
    assert metrics["output_rows"] == reference.num_rows
    assert pq.read_table(out).equals(reference)  # bit-identical: ids, carried columns, vectors
    assert not Path(WorkFolder(out).path).exists()
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_cleanly_and_resume_completes(signum, job_args, reference, tmp_path):
    out = tmp_path / "vecs.parquet"
    args = [sys.executable, "-m", "jobs.embed", *job_args, "--out", str(out), "--max-batch-size", "2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_part = Path(WorkFolder(out).path) / part_name(0)
    deadline = time.monotonic() + 120
    while not first_part.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert not out.exists()

    resumed = run_job([*job_args, "--out", str(out), "--max-batch-size", "2", "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert last_json(resumed.stdout)["resumed_rows"] >= WINDOW
    table = pq.read_table(out)
    assert table.column("id").equals(reference.column("id"))
    assert min_cosine(table, reference) >= 0.99999  # batch size differs from the reference run


def min_cosine(a: pa.Table, b: pa.Table) -> float:
    def vectors(t):
        column = t.column("embedding").combine_chunks()
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        return valid, column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)  # null slots included

    valid_a, va = vectors(a)
    valid_b, vb = vectors(b)
    assert np.array_equal(valid_a, valid_b)
    return float((va[valid_a] * vb[valid_b]).sum(axis=1).min())


def test_progress_from_other_options_is_refused_until_restart(job_args, tmp_path, capsys):
    out = tmp_path / "vecs.parquet"
    armed = fault_env(tmp_path / "fault.json", point="window", count=2)
    assert run_job([*job_args, "--out", str(out)], **armed).returncode == -signal.SIGKILL
    assert embed_main([*job_args, "--out", str(out), "--max-tokens", "256"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds progress of a run with different batching" in err and "--restart" in err
    assert not out.exists()

    assert embed_main([*job_args, "--out", str(out), "--max-tokens", "256", "--restart"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_rows"] == 0


def test_resume_without_progress_is_an_error(job_args, tmp_path, capsys):
    out = tmp_path / "vecs.parquet"
    assert embed_main([*job_args, "--out", str(out), "--resume"]) == 2
    assert "no progress to resume" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("count", [1, 3, 7])
def test_shards_in_order_make_the_unsharded_output(count, job_args, reference, tmp_path):
    parts = []
    for index in range(count):
        out = tmp_path / f"shard-{index}.parquet"
        assert embed_main([*job_args, "--out", str(out), "--shard", f"{index}/{count}"]) == 0
        parts.append(pq.read_table(out))
    ids = [p.column("id").to_pylist() for p in parts]
    assert all(ids) or count > 12  # 12 row groups: every shard gets some when count <= 12
    union = pa.concat_tables(parts)
    assert union.column("id").equals(reference.column("id"))  # same rows, no duplicates, same order
    assert union.column("source").equals(reference.column("source"))
    assert min_cosine(union, reference) >= 0.99999


def test_a_second_job_on_the_same_output_fails_clearly(job_args, tmp_path, capsys):
    out = tmp_path / "vecs.parquet"
    with WorkFolder(out).locked():
        assert embed_main([*job_args, "--out", str(out)]) == 1
    assert f"another job is writing {out}" in capsys.readouterr().err
    assert not out.exists()


def test_two_jobs_on_a_cold_cache_export_once(model_zoo, corpus, tmp_path):
    cache = tmp_path / "cold-cache"
    procs = [
        subprocess.Popen([sys.executable, "-m", "jobs.embed", "--in", str(corpus), "--model", model_zoo.model_arg("roberta"),
                          "--cache-dir", str(cache), "--out", str(tmp_path / f"{n}.parquet"), "--progress", "off",
                          "--device", "cpu"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in ("a", "b")
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    hits = sorted(last_json(stdout)["cache_hit"] for stdout, _ in results)
    assert hits == [False, True]
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


def test_peak_memory_is_bounded_by_the_window_not_the_corpus(model_zoo, export_cache_dir, exported, tmp_path):
    """Ten times the rows, same window: peak RSS stays flat (each run in a fresh process)."""
    exported("bert")
    peaks = {}
    for rows in (4_000, 40_000):
        corpus = make_corpus(tmp_path / f"c{rows}.parquet", rows=rows, row_group_rows=1_000)
        proc = run_job(["--in", str(corpus), "--out", str(tmp_path / f"v{rows}.parquet"), "--model",
                        model_zoo.model_arg("bert"), "--cache-dir", str(export_cache_dir), "--window-rows", "1000",
                        "--progress", "off"])
        assert proc.returncode == 0, proc.stderr
        metrics = last_json(proc.stdout)
        assert metrics["output_rows"] == rows
        peaks[rows] = metrics["peak_rss_mb"]
    # Holding the whole corpus (text, token ids) would add about 30 MB at 40,000 rows; runs vary by ~10 MB.
    assert peaks[40_000] <= peaks[4_000] + 15, peaks


def test_the_library_reads_no_fault_setting_of_its_own(job_args, reference, tmp_path):
    """Only the test-only site module acts on a fault spec: a stray variable in production changes nothing."""
    out = tmp_path / "vecs.parquet"
    armed = fault_env(tmp_path / "fault.json", point="batch", count=1)
    env = {"EMBEDDER_TEST_FAULT_FILE": armed["EMBEDDER_TEST_FAULT_FILE"], "EMBEDDER_CRASH_AT": "batch:1",
           "EMBEDDER_CRASH_ONCE": f"written:{tmp_path / 'marker'}"}
    proc = run_job([*job_args, "--out", str(out)], **env)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out).equals(reference)


def committed_after_kill(job_args, out: Path, tmp_path: Path, windows: int) -> list[Path]:
    armed = fault_env(tmp_path / "fault.json", point="window", count=windows)
    assert run_job([*job_args, "--out", str(out)], **armed).returncode == -signal.SIGKILL
    return [Path(WorkFolder(out).path) / part_name(i) for i in range(windows)]


def test_a_truncated_committed_part_is_detected_and_its_windows_redone(job_args, reference, tmp_path):
    out = tmp_path / "vecs.parquet"
    parts = committed_after_kill(job_args, out, tmp_path, 4)
    parts[1].write_bytes(parts[1].read_bytes()[:-100])  # a torn write: the footer is gone

    resumed = run_job([*job_args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert "part-000001.parquet is damaged" in resumed.stderr and "redoing window 1" in resumed.stderr
    assert last_json(resumed.stdout)["resumed_rows"] == WINDOW  # only the part before the damaged one is kept
    assert pq.read_table(out).equals(reference)


def test_a_part_of_another_size_is_redone(job_args, reference, tmp_path):
    out = tmp_path / "vecs.parquet"
    parts = committed_after_kill(job_args, out, tmp_path, 3)
    table = pq.read_table(parts[2])
    pq.write_table(pa.concat_tables([table, table.slice(0, 10)]), parts[2])  # readable, but no window of this run

    resumed = run_job([*job_args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert "110 input rows where a window holds at most 100" in resumed.stderr
    assert last_json(resumed.stdout)["resumed_rows"] == 2 * WINDOW
    assert pq.read_table(out).equals(reference)


def test_a_corrupt_page_is_caught_at_the_merge_then_redone_by_the_rerun(job_args, reference, tmp_path):
    out = tmp_path / "vecs.parquet"
    parts = committed_after_kill(job_args, out, tmp_path, 4)
    chunk = pq.read_metadata(parts[2]).row_group(0).column(0)  # footer intact, a data page damaged
    data = bytearray(parts[2].read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0xFF
    parts[2].write_bytes(bytes(data))

    failed = run_job([*job_args, "--out", str(out)])
    assert failed.returncode == 1, failed.stderr
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("jobs.embed: error: committed part") and "part-000002.parquet is corrupt" in line
    assert not out.exists() and parts[1].exists() and not parts[2].exists()

    resumed = run_job([*job_args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert last_json(resumed.stdout)["resumed_rows"] == 2 * WINDOW
    assert pq.read_table(out).equals(reference)


@pytest.mark.parametrize(("change", "named"), [
    ("inputs", "inputs"),
    ("model", "model"),
    ("prompt", "prompt"),
])
def test_a_rerun_after_the_inputs_model_or_prompt_changed_is_refused_naming_it(change, named, job_args, model_zoo,
                                                                               corpus, tmp_path, capsys):
    import shutil

    out = tmp_path / "vecs.parquet"
    args = list(job_args)
    if change == "inputs":  # a copy of the corpus, so the module's own files stay as they are
        copy = tmp_path / "corpus"
        shutil.copytree(corpus, copy)
        args[args.index("--in") + 1] = str(copy)
    committed_after_kill(args, out, tmp_path, 2)
    if change == "inputs":
        first = sorted(copy.glob("*.parquet"))[0]
        pq.write_table(pq.read_table(first), first, row_group_size=100)  # rewritten: same rows, a new file
    elif change == "model":
        args[args.index("--model") + 1] = model_zoo.model_arg("roberta")
    else:
        args += ["--prompt", "query: "]

    assert embed_main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    differs = err.split("with different ")[1].split(";")[0].split(", ")
    assert named in differs, err
    assert "--restart" in err and not out.exists()


def folder_table(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))


def test_a_folder_out_holds_the_parts_and_success_and_resumes_after_kill_9(job_args, reference, tmp_path):
    out = tmp_path / "vecs"
    args = [*job_args, "--out", f"{out}/"]
    killed = run_job(args, **fault_env(tmp_path / "fault.json", point="window", count=5))
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()  # a reader listing the folder never sees part of it

    resumed = run_job(args)
    assert resumed.returncode == 0, resumed.stderr
    assert last_json(resumed.stdout)["resumed_rows"] == 5 * WINDOW
    names = sorted(p.name for p in out.iterdir())
    assert names == ["_SUCCESS", *(part_name(i) for i in range(12))]  # 1,200 rows in windows of 100, no merge
    assert folder_table(out).equals(reference)
    assert pq.read_table(out).num_rows == reference.num_rows  # pyarrow reads the folder, skipping _SUCCESS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fault.json", "vecs"]  # work folder removed


def test_a_folder_out_is_refused_if_it_exists_and_replaced_with_overwrite(job_args, reference, tmp_path):
    out = tmp_path / "vecs"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"someone else's")
    refused = run_job([*job_args, "--out", f"{out}/"])
    assert refused.returncode == 2 and "exists; pass --overwrite" in refused.stderr
    replaced = run_job([*job_args, "--out", f"{out}/", "--overwrite"])
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "old.parquet").exists() and (out / "_SUCCESS").exists()
    assert folder_table(out).equals(reference)
    # A file path naming an existing folder, and a folder path naming an existing file, are usage errors.
    as_file = run_job([*job_args, "--out", str(out), "--overwrite"])
    assert as_file.returncode == 2 and "end it with '/'" in as_file.stderr
    (tmp_path / "file.parquet").write_bytes(b"x")
    as_folder = run_job([*job_args, "--out", f"{tmp_path / 'file.parquet'}/", "--overwrite"])
    assert as_folder.returncode == 2 and "drop the trailing '/'" in as_folder.stderr


@pytest.mark.parametrize("skip", [0, 50, 99, 100, 250, 300, 349, 350, 499, 500])
def test_skipping_committed_rows_reads_exactly_the_rest(skip, tmp_path):
    """A resumed run skips the committed rows: whole leading row groups unread, then the rest of a row group
    sliced, whatever the row groups' sizes (here 100, 100, 50 in each of two files) and the files' edges."""
    from embedder.io.parquet import iter_record_batches, open_inputs

    folder = tmp_path / "parts"
    folder.mkdir()
    for index, start in enumerate((0, 250)):
        ids = list(range(start, start + 250))
        pq.write_table(pa.table({"id": ids, "text": [f"row {i}" for i in ids]}), folder / f"part-{index}.parquet",
                       row_group_size=100)
    inputs = open_inputs(str(folder), "text", None)
    read = [i for batch in iter_record_batches(inputs, 64, skip_rows=skip) for i in batch.column("id").to_pylist()]
    assert read == list(range(skip, 500))
