"""Incremental runs (--reuse): what a nightly re-embed of a corpus that changed by 2% costs, and the memory of a
reuse against a very large previous output.

    python scripts/bench_reuse.py nightly --rows 200000 --edit-fraction 0.02   # full run, then the reuse run
    python scripts/bench_reuse.py memory --prev-rows 10000000                 # PREV of 10 million rows

nightly: a docstring corpus (scripts/make_corpus.py) is embedded in full with the default model at its default
max length, then the same corpus with --edit-fraction of its rows edited or replaced (make_corpus.py
--edit-fraction) is embedded with --reuse of the first output; both wall times come from the same script run.
memory: PREV is synthesized in the job's output schema (the tiny test BERT's metadata, random keys and random
unit vectors of its 16 dimensions, plus the keys of a real small run so that those rows are found), and a
20,000-row corpus is embedded with --reuse PREV; the job's own peak RSS is reported.
Results go to bench/reuse.json (merged by section).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "reuse.json"


def cpu() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-512" if "avx512f" in flags else (
        "AVX2" if "avx2" in flags else "no AVX2")
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "")
    return f"{model or platform.processor()}, {isa}"


def make_corpus(out: Path, rows: int, *extra: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(out), "--rows", str(rows),
                    *extra], check=True, capture_output=True)


def embed(*args: str) -> dict:
    """jobs.embed in its own process; its metrics, plus the wall time seen from here."""
    with tempfile.NamedTemporaryFile(suffix=".json") as metrics:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jobs.embed", "--progress", "off", "--metrics-out", metrics.name, *args],
                       cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - started
        result = json.loads(Path(metrics.name).read_text())
    result["process_seconds"] = round(wall, 2)
    return result


def nightly(args) -> dict:
    subprocess.run([sys.executable, "-m", "jobs.export"], cwd=ROOT, check=True, capture_output=True)  # warm cache
    with tempfile.TemporaryDirectory(prefix="embedder-reuse-") as tmp:
        tmp = Path(tmp)
        make_corpus(tmp / "day1.parquet", args.rows)
        make_corpus(tmp / "day2.parquet", args.rows, "--edit-fraction", str(args.edit_fraction))
        full = embed("--in", str(tmp / "day1.parquet"), "--out", str(tmp / "day1.vec.parquet"))
        reuse = embed("--in", str(tmp / "day2.parquet"), "--out", str(tmp / "day2.vec.parquet"),
                      "--reuse", str(tmp / "day1.vec.parquet"), "--id-col", "id")
        changes = pq.read_table(str(tmp / "day2.vec.parquet") + ".changes.parquet")
    keep = ("rows", "reused_rows", "real_tokens", "wall_seconds", "process_seconds", "peak_rss_mb", "stage_seconds")
    return {
        "rows": args.rows, "edit_fraction": args.edit_fraction, "machine": cpu(),
        "full": {k: full[k] for k in keep}, "reuse": {k: reuse[k] for k in keep},
        "changed_ids": changes.num_rows,
        "reuse_over_full_wall": round(reuse["process_seconds"] / full["process_seconds"], 4),
    }


def memory(args) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from models import BUILDERS  # the tiny test BERT: 16 dimensions, so 10 million vectors fit on disk

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="embedder-reuse-memory-") as tmp:
        tmp = Path(tmp)
        model = BUILDERS["bert"](tmp / "models")
        cache = tmp / "cache"
        common = ["--model", str(model), "--cache-dir", str(cache), "--pooling", "mean"]
        make_corpus(tmp / "small.parquet", args.rows)
        small = tmp / "small.vec.parquet"
        embed("--in", str(tmp / "small.parquet"), "--out", str(small), *common)
        real = pq.read_table(small)
        schema = real.schema
        prev = tmp / "prev"
        prev.mkdir()
        started = time.perf_counter()
        dim = schema.field("embedding").type.list_size
        group = 500_000
        for index, start in enumerate(range(0, args.prev_rows, group)):
            count = min(group, args.prev_rows - start)
            keys = rng.integers(0, 256, size=(count, 16), dtype=np.uint8)
            vectors = rng.standard_normal((count, dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            ids = np.arange(start, start + count, dtype=np.int64)
            table = pa.table({
                "id": ids, "source": pa.array(["synthetic"] * count),
                "text_key": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), count, [None, pa.py_buffer(keys.tobytes())]),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            })
            if index == 0:  # the real rows' keys and vectors lead PREV, so a reuse finds them
                head = real.select(["id", "source", "text_key", "embedding"])
                table = pa.concat_tables([head.cast(table.schema), table.slice(head.num_rows)])
            pq.write_table(table.replace_schema_metadata(schema.metadata), prev / f"part-{index:06d}.parquet",
                           row_group_size=100_000)
        synthesized = time.perf_counter() - started
        size = sum(p.stat().st_size for p in prev.iterdir())
        result = embed("--in", str(tmp / "small.parquet"), "--out", str(tmp / "again.parquet"), "--reuse",
                       str(prev) + "/", *common)
    return {"machine": cpu(), "prev_rows": args.prev_rows, "prev_bytes": size, "rows": args.rows,
            "synthesize_seconds": round(synthesized, 1), "reused_rows": result["reused_rows"],
            "peak_rss_mb": result["peak_rss_mb"], "wall_seconds": result["wall_seconds"],
            "stage_seconds": result["stage_seconds"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    n = sub.add_parser("nightly")
    n.add_argument("--rows", type=int, default=200_000)
    n.add_argument("--edit-fraction", type=float, default=0.02)
    m = sub.add_parser("memory")
    m.add_argument("--prev-rows", type=int, default=10_000_000)
    m.add_argument("--rows", type=int, default=20_000)
    args = p.parse_args()
    result = nightly(args) if args.what == "nightly" else memory(args)
    print(json.dumps(result, indent=2))
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stored[args.what] = result
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(stored, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
