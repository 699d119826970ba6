"""What the storage choices cost: a file OUT against a folder OUT, and a corpus in a bucket against one on disk.

    python scripts/bench_storage.py                      # 1,000,000 rows in 8 files, tiny test BERT, ~15 min on 2 cores

One run, one corpus (scripts/make_corpus.py), one model, the same batching for every case:
    local -> file     --in corpus/ --out vecs.parquet      the committed parts merged into one file
    local -> folder   --in corpus/ --out vecs/             the committed parts are OUT: no second write
    bucket -> folder  --in s3://bench/corpus/ --out vecs/  the corpus read from moto's S3 server (127.0.0.1)
    (--cases ... bucket-bucket adds --out s3://bench/out/vecs/)
Per case: wall seconds of the job process (start to exit), its CPU seconds (user + system, steadier than wall
on a shared machine; the load average around each case is recorded), its `write` stage seconds (window
commits plus the publish, from the metrics JSON), its peak RSS (wait4's ru_maxrss of the job process; moto holds the
objects in its own process, which is not counted), the output bytes and rows. Every output is checked to
hold the same rows and vectors as the first case. Writes bench/storage_results.json and prints it.

The model defaults to the tiny "bert" test model (tests/models.py, 2 layers of 32): this measures storage,
and with it inference is a small share of the time. --model all-MiniLM-L6-v2 uses the real one (slower).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "bench"
CASES = {  # name: (input is in the bucket, OUT kind)
    "local-file": (False, "file"),
    "local-folder": (False, "folder"),
    "bucket-folder": (True, "folder"),
    "bucket-bucket": (True, "bucket-folder"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--row-group-rows", type=int, default=10_000)
    p.add_argument("--window-rows", type=int, default=20_000)
    p.add_argument("--max-seq-len", type=int, default=16)
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: the job's, one per core)")
    p.add_argument("--model", help="model folder or id (default: the tiny 'bert' test model, built here)")
    p.add_argument("--cases", default="local-file,local-folder,bucket-folder",
                   help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--out-json", type=Path, default=ROOT / "bench" / "storage_results.json")
    args = p.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or any(c not in CASES for c in cases):
        p.error(f"--cases: choose from {', '.join(CASES)}")

    with tempfile.TemporaryDirectory(prefix="embedder-storage-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or build_tiny_model(tmp / "models")
        cache = tmp / "cache"
        # Export in its own process first: torch's footprint belongs to the export, not to the runs.
        subprocess.run([sys.executable, "-m", "jobs.export", "--model", model, "--cache-dir", str(cache)],
                       cwd=ROOT, check=True, capture_output=True)
        corpus = tmp / "corpus"
        (tmp / "out").mkdir()
        made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(corpus),
                               "--rows", str(args.rows), "--files", str(args.files),
                               "--row-group-rows", str(args.row_group_rows)],
                              check=True, capture_output=True, text=True)
        corpus_info = json.loads(made.stdout.strip().splitlines()[-1])
        corpus_info.pop("out", None)
        corpus_info["bytes"] = sum(f.stat().st_size for f in corpus.glob("*.parquet"))
        corpus_info["row_group_rows"] = args.row_group_rows

        job_args = ["--model", model, "--cache-dir", str(cache), "--max-seq-len", str(args.max_seq_len),
                    "--window-rows", str(args.window_rows), "--device", "cpu", "--progress", "off"]
        if args.threads:
            job_args += ["--threads", str(args.threads)]

        moto = load_moto_server()
        with moto(tmp / "moto.log") as env:
            os.environ.update(env)  # boto3 here and the job's subprocesses both talk to the server
            import boto3

            s3 = boto3.client("s3")
            s3.create_bucket(Bucket=BUCKET)
            started = time.perf_counter()
            for path in sorted(corpus.glob("*.parquet")):
                s3.upload_file(str(path), BUCKET, f"corpus/{path.name}")
            corpus_info["upload_seconds"] = round(time.perf_counter() - started, 2)

            results, reference = [], None
            for name in cases:
                in_bucket, kind = CASES[name]
                src = f"s3://{BUCKET}/corpus/" if in_bucket else str(corpus) + "/"
                out = {"file": str(tmp / "out" / f"{name}.parquet"), "folder": str(tmp / "out" / name) + "/",
                       "bucket-folder": f"s3://{BUCKET}/out/{name}/"}[kind]
                result = run_case(name, [*job_args, "--in", src, "--out", out], tmp / "logs" / name)
                table = read_output(out, s3)
                result["output_bytes"] = output_bytes(out, s3)
                result["output_files"] = output_files(out, s3)
                result["rows_in_output"] = table.num_rows
                if reference is None:
                    reference = table
                result["same_rows_and_vectors_as_first"] = table.equals(reference)
                del table
                results.append(result)
                print(json.dumps(result), file=sys.stderr)

    by_name = {r["case"]: r for r in results}
    summary = {
        "machine": machine(),
        "software": software(),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model or "tiny test bert (tests/models.py: 2 layers, hidden 32, vocab ~600, dim 16)",
        "settings": {"max_seq_len": args.max_seq_len, "window_rows": args.window_rows,
                     "threads": args.threads or "default (one per core)", "device": "cpu"},
        "corpus": corpus_info,
        "results": results,
    }
    if {"local-file", "local-folder"} <= by_name.keys():
        summary["folder_out_saving"] = saving(by_name["local-file"], by_name["local-folder"])
    if {"local-folder", "bucket-folder"} <= by_name.keys():
        summary["bucket_in_vs_local_in"] = against(by_name["local-folder"], by_name["bucket-folder"])
    problems = [f"{r['case']}: {r['rows_in_output']} rows in OUT, {r['output_rows']} reported, {args.rows} in"
                for r in results if not (r["rows_in_output"] == r["output_rows"] == args.rows)]
    problems += [f"{r['case']}: rows or vectors differ from {results[0]['case']}"
                 for r in results if not r["same_rows_and_vectors_as_first"]]
    summary["problems"] = problems
    text = json.dumps(summary, indent=2)
    args.out_json.write_text(text + "\n")
    print(text)
    return 1 if problems else 0


def build_tiny_model(root: Path) -> str:
    """The tiny 'bert' family of tests/models.py, built in a subprocess (torch stays out of this one)."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); from models import BUILDERS; "
            "print(BUILDERS['bert'](Path(sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests"), str(root)], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def load_moto_server():
    """tests/s3_server.py's moto_server (tests/ is not a package: its folder goes on sys.path, as pytest puts it)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from s3_server import moto_server

    return moto_server


def run_case(name: str, job: list[str], logs: Path) -> dict:
    """Run jobs.embed once; its wall time and peak RSS are taken from outside, by wait4."""
    logs.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "jobs.embed", *job], cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: jobs.embed exited {proc.returncode}: python -m jobs.embed {' '.join(job)}\n"
                         + (logs / "stderr").read_text()[-3000:])
    metrics = json.loads((logs / "stdout").read_text().strip().splitlines()[-1])
    return {
        "case": name,
        "command": "python -m jobs.embed " + " ".join(job),
        "wall_seconds": round(wall, 2),
        "job_wall_seconds": metrics["wall_seconds"],
        "write_seconds": metrics["stage_seconds"]["write"],
        "stage_seconds": metrics["stage_seconds"],
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "metrics_peak_rss_mb": metrics["peak_rss_mb"],
        "output_rows": metrics["output_rows"],
        "windows": metrics["windows"],
        "rows_per_second": metrics["rows_per_second"],
        # The 1-minute load average before and after: wall seconds on a shared machine mean little without it.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def _bucket_keys(s3, out: str) -> list[dict]:
    prefix = out.removeprefix(f"s3://{BUCKET}/")
    return [o for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]


def output_bytes(out: str, s3) -> int:
    if out.startswith("s3://"):
        return sum(o["Size"] for o in _bucket_keys(s3, out))
    path = Path(out)
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def output_files(out: str, s3) -> int:
    if out.startswith("s3://"):
        return len(_bucket_keys(s3, out))
    return len(list(Path(out).iterdir())) if out.endswith("/") else 1


def read_output(out: str, s3) -> pa.Table:
    """OUT's rows in order: the file, or a folder's part files in name order (after checking _SUCCESS)."""
    if out.startswith("s3://"):
        keys = sorted(o["Key"] for o in _bucket_keys(s3, out))
        assert any(k.endswith("/_SUCCESS") for k in keys), keys[:3]
        return pa.concat_tables(pq.read_table(pa.BufferReader(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
                                for k in keys if k.rsplit("/", 1)[1].startswith("part-"))
    path = Path(out)
    if not path.is_dir():
        return pq.read_table(path)
    assert (path / "_SUCCESS").exists()
    return pa.concat_tables(pq.read_table(f) for f in sorted(path.glob("part-*.parquet")))


def saving(file_case: dict, folder_case: dict) -> dict:
    """What writing the parts as OUT saves over merging them into one file (file minus folder)."""
    keys = ("wall_seconds", "write_seconds", "cpu_seconds", "peak_rss_mb", "output_bytes")
    diff = {k: round(file_case[k] - folder_case[k], 2) for k in keys}
    diff["wall_percent"] = round(100 * diff["wall_seconds"] / file_case["wall_seconds"], 1)
    diff["write_percent"] = round(100 * diff["write_seconds"] / file_case["write_seconds"], 1)
    return diff


def against(local: dict, bucket: dict) -> dict:
    """The bucket-input case against the same run with the corpus on disk."""
    ratio = bucket["peak_rss_mb"] / local["peak_rss_mb"]
    return {"peak_rss_mb_local": local["peak_rss_mb"], "peak_rss_mb_bucket": bucket["peak_rss_mb"],
            "peak_rss_ratio": round(ratio, 3), "rss_within_10_percent": ratio <= 1.10,
            "wall_seconds_local": local["wall_seconds"], "wall_seconds_bucket": bucket["wall_seconds"],
            "wall_ratio": round(bucket["wall_seconds"] / local["wall_seconds"], 3),
            "read_seconds_local": local["stage_seconds"]["read"],
            "read_seconds_bucket": bucket["stage_seconds"]["read"]}


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    name = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), platform.processor())
    flags = next((l.split(":", 1)[1].split() for l in info if l.startswith("flags")), [])
    mem_kb = next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                   if l.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return {"platform": platform.platform(), "processor": name, "cores": os.cpu_count(),
            "isa": " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags),
            "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "vnni": "avx512_vnni" in flags or "avx_vnni" in flags, "memory_gb": round(mem_kb / 2**20, 1)}


def software() -> dict:
    from importlib import metadata

    found = {}
    for name in ("onnxruntime", "onnxruntime-gpu", "pyarrow", "tokenizers", "boto3", "moto"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["python"] = platform.python_version()
    found["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False, capture_output=True,
                                     text=True).stdout.strip() or None
    return found


if __name__ == "__main__":
    sys.exit(main())
