"""Output file size and write time per --output-dtype on the sample corpus.

    python scripts/make_corpus.py --out data/sample.parquet
    python scripts/bench_output_dtypes.py --in data/sample.parquet

For each dtype, jobs.embed end to end (one run, warm graph cache): the output file's bytes, the job's `write`
stage and its wall time. Then, from the float32 run's vectors, what writing costs per dtype without the model:
the vectors stored as the dtype (embedder/infer/vectors.py: truncation, ranges, quantization) and written to
Parquet as the job writes a window (page checksums, pyarrow's default compression), --repeats times, median.
Writes bench/output_dtypes.json with the machine (CPU model and vector extensions) and package versions.
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
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _cpu_name, _isa, _version  # noqa: E402  (scripts/bench.py: how every bench names the machine)
from embedder.infer.vectors import FIRST_WINDOW, VectorFormat  # noqa: E402
from embedder.schema import OUTPUT_DTYPES, embedding_array  # noqa: E402


def run_job(source: Path, out: Path, dtype: str, threads: int) -> dict:
    """jobs.embed with --output-dtype dtype; its metrics JSON."""
    command = [sys.executable, "-m", "jobs.embed", "--in", str(source), "--out", str(out), "--device", "cpu",
               "--threads", str(threads), "--output-dtype", dtype, "--progress", "off", "--log-level", "WARNING",
               "--overwrite"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_seconds(carried: pa.Table, vectors: np.ndarray, valid: np.ndarray, dtype: str, path: Path) -> tuple[float, float]:
    """(seconds to store the vectors as dtype, seconds to write the table as the job commits a window)."""
    started = time.perf_counter()
    vector_format = VectorFormat(vectors.shape[1], dtype)
    if vector_format.needs_ranges:
        vector_format = vector_format.calibrated(vectors, FIRST_WINDOW)
    stored = vector_format.store(vectors)
    stored_at = time.perf_counter()
    table = carried.append_column("embedding", embedding_array(stored, valid))
    with pq.ParquetWriter(path, table.schema, write_page_checksum=True) as writer:
        writer.write_table(table)
    return stored_at - started, time.perf_counter() - stored_at


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="inputs", type=Path, default=ROOT / "data" / "sample.parquet")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "output_dtypes.json")
    args = p.parse_args()
    if not args.inputs.is_file():
        p.error(f"{args.inputs} does not exist: python scripts/make_corpus.py --out {args.inputs}")

    results = []
    with tempfile.TemporaryDirectory(prefix="embedder-bench-") as tmp:
        outputs = {}
        for dtype in OUTPUT_DTYPES:
            out = Path(tmp) / f"{dtype}.parquet"
            metrics = run_job(args.inputs, out, dtype, args.threads)
            outputs[dtype] = (out, metrics)
            print(f"{dtype}: {out.stat().st_size} bytes, write {metrics['stage_seconds']['write']:.3f} s", flush=True)

        table = pq.read_table(outputs["float32"][0])
        column = table.column("embedding").combine_chunks()
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        vectors = column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)[valid]
        carried = table.drop_columns(["embedding"])
        timings = {dtype: [] for dtype in OUTPUT_DTYPES}
        for round_ in range(args.repeats):  # dtypes alternate, in reversed order every other round
            order = list(OUTPUT_DTYPES) if round_ % 2 == 0 else list(OUTPUT_DTYPES)[::-1]
            for dtype in order:
                timings[dtype].append(write_seconds(carried, vectors, valid, dtype, Path(tmp) / "w.parquet"))

        base = outputs["float32"][0].stat().st_size
        for dtype in OUTPUT_DTYPES:
            out, metrics = outputs[dtype]
            size = out.stat().st_size
            store, write = (float(np.median(values)) for values in zip(*timings[dtype]))
            results.append({
                "dtype": dtype,
                "embedding_type": str(pq.read_schema(out).field("embedding").type),
                "file_bytes": size,
                "bytes_per_row": round(size / table.num_rows, 1),
                "size_vs_float32": round(size / base, 4),
                "job_write_seconds": metrics["stage_seconds"]["write"],
                "job_wall_seconds": metrics["wall_seconds"],
                "store_seconds_median": round(store, 5),
                "parquet_write_seconds_median": round(write, 5),
            })

    summary = {
        "command": "python scripts/bench_output_dtypes.py " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": {"processor": _cpu_name(), "isa": _isa(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "threads": args.threads},
        "software": {name: _version(name) for name in ("onnxruntime", "onnxruntime-gpu", "pyarrow", "numpy")},
        "model": "all-MiniLM-L6-v2 (dim 384)",
        "rows": table.num_rows,
        "embedded_rows": int(valid.sum()),
        "repeats": args.repeats,
        "results": results,
    }
    summary["software"]["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                   capture_output=True, text=True, check=False).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print("| dtype | embedding | file bytes | vs float32 | store s | Parquet write s | job write s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | `{r['embedding_type']}` | {r['file_bytes']:,} | {r['size_vs_float32']:.3f} | "
              f"{r['store_seconds_median']:.4f} | {r['parquet_write_seconds_median']:.4f} | {r['job_write_seconds']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
