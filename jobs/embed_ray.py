"""python -m jobs.embed_ray --in IN --out OUT_FOLDER: the batch job on a Ray cluster (or a local Ray).

Same model, pooling, precision and batching options as jobs.embed, and the same local paths and s3:// URIs;
the output is a folder of Parquet part files with the same schema and metadata, and a _SUCCESS marker. Needs the `ray` extra (pip install '.[ray]').
Exit codes: 0 done; 1 failure at run time; 2 bad input or usage; 130/143 stopped by SIGINT/SIGTERM.
The metrics JSON is the last line of stdout.
"""

from __future__ import annotations

import argparse
import sys

from jobs._cli import run_job, setup_logging
from jobs.embed import add_model_options, add_reporting_options, config_from_args

GRAPH_TRANSFERS = ("auto", "path", "object-store")  # embedder.run.ray_driver.GRAPH_TRANSFERS, without importing it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.embed_ray",
        description="Embed a Parquet text column on Ray Data: an actor pool runs the same ONNX graph and batching as "
        "jobs.embed and writes a folder of Parquet part files (carried columns plus 'embedding').",
        epilog="Exit codes: 0 done, 1 run-time failure, 2 bad input or usage, 130/143 stopped by SIGINT/SIGTERM "
        "(OUT is not written; rerun to start over).",
    )
    p.add_argument("--in", dest="inputs", required=True, help="a Parquet file, a folder of them, or a glob; an s3://, "
                   "gs:// or az:// URI or a local path on storage every node sees")
    p.add_argument("--out", required=True, help="output folder of Parquet part files, with or without a trailing '/'; "
                   "an s3://, gs:// or az:// URI or a local path every node sees (complete when its _SUCCESS marker "
                   "is there; on disk it appears only when complete)")
    add_model_options(p, threads_default="--cpus-per-worker, at least 1")
    p.add_argument("--workers", type=int, default=1, help="actors, each with its own onnxruntime session (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves for each actor (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs Ray reserves for each actor; above 0 the actors run on CUDA (default 0)")
    p.add_argument("--address", help="Ray cluster to join ('auto': the one started with 'ray start' here; host:port; ray://host:10001); "
                   "default: the one in RAY_ADDRESS, else a new local Ray for this run")
    p.add_argument("--graph-transfer", default="auto", choices=GRAPH_TRANSFERS,
                   help="how actors get the graph: 'path' reads the cache folder (shared storage), 'object-store' ships its bytes; "
                   "auto: path on a one-node cluster, object-store otherwise")
    p.add_argument("--reuse", metavar="PREV", help="an earlier output of this job: rows whose text it holds, made with "
                   "the same model and options, take its vectors (each actor indexes PREV's keys)")
    p.add_argument("--reuse-strict", action="store_true", help="a PREV made with other options is an error (exit 2)")
    p.add_argument("--max-retries", type=int, default=3, help="restarts of a dead actor and retries of its block (default 3)")
    add_reporting_options(p)
    p.set_defaults(shard="0/1", resume=False, restart=False)  # single-process options that do not apply here
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    def embed() -> dict:
        from embedder.run.ray_driver import RayOptions, run  # after argument parsing: --help stays instant

        options = RayOptions(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                             gpus_per_worker=args.gpus_per_worker, address=args.address,
                             graph_transfer=args.graph_transfer, max_retries=args.max_retries)
        return run(config_from_args(args), options)

    return run_job("jobs.embed_ray", args, embed)

if __name__ == "__main__":
    sys.exit(main())
