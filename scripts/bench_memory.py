"""Peak memory of jobs.embed on a large corpus: it must stay flat in corpus size.

    python scripts/bench_memory.py --rows 1000000            # about 1.5 GB is the ceiling to stay under

Makes a docstring corpus of --rows rows (scripts/make_corpus.py), embeds it with the default model
(truncated to --max-seq-len tokens so a million rows take minutes, not hours: memory is set by the
window, not by the sequence length) and prints the run's peak RSS with the run's own figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=16)
    p.add_argument("--limit-mb", type=float, default=1536)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="embedder-memory-") as tmp:
        corpus, out, metrics_file = Path(tmp) / "corpus", Path(tmp) / "vecs.parquet", Path(tmp) / "metrics.json"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(corpus),
                        "--rows", str(args.rows), "--files", str(args.files)], check=True, capture_output=True)
        # Export first, in its own process: torch's footprint belongs to the export, not the run.
        subprocess.run([sys.executable, "-m", "jobs.export"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "jobs.embed", "--in", str(corpus), "--out", str(out), "--progress", "off",
                        "--max-seq-len", str(args.max_seq_len), "--metrics-out", str(metrics_file)],
                       cwd=ROOT, check=True, capture_output=True)
        metrics = json.loads(metrics_file.read_text())
    result = {key: metrics[key] for key in ("output_rows", "peak_rss_mb", "wall_seconds", "rows_per_second", "batching")}
    result["max_seq_len"] = args.max_seq_len
    result["under_limit"] = metrics["peak_rss_mb"] < args.limit_mb
    print(json.dumps(result))
    return 0 if result["under_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
