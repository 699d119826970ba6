"""python -m jobs.embed --in IN --out OUT: embed a Parquet text column into normalized vectors.

Exit codes: 0 done; 1 failure at run time; 2 bad input or usage; 130/143 stopped by SIGINT/SIGTERM
(committed windows are kept: rerun the same command to resume).
The metrics JSON is the last line of stdout.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from embedder.config import (
    CHUNK_POOLINGS,
    DEFAULT_OPSET,
    PRECISIONS,
    ExportOptions,
    JobConfig,
    OutputOptions,
    chunk_options,
)
from embedder.schema import OUTPUT_DTYPES
from jobs._cli import run_job, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.embed",
        description="Embed a Parquet text column with a sentence-transformers model exported to ONNX; "
        "write the carried columns plus a normalized 'embedding' column to Parquet.",
        epilog="Exit codes: 0 done, 1 run-time failure, 2 bad input or usage, 130/143 stopped by SIGINT/SIGTERM "
        "(rerun the same command to resume).",
    )
    p.add_argument("--in", dest="inputs", required=True, help="a Parquet file, a folder of them, or a glob; a local path or an s3://, gs:// or az:// URI")
    p.add_argument("--out", required=True, help="output Parquet file, or a folder of part files if it ends in '/'; a "
                   "local path, s3://, gs:// or az:// URI (appears only when complete)")
    add_model_options(p)
    p.add_argument("--reuse", metavar="PREV", help="an earlier output of this job (file, folder or glob): rows whose "
                   "text it holds, made with the same model and options, take its vectors instead of being embedded")
    p.add_argument("--reuse-strict", action="store_true", help="a PREV made with other options (or without text "
                   "keys) is an error (exit 2) instead of a warning and a full run")
    p.add_argument("--id-col", help="with --reuse: also write OUT.changes.parquet, the ids added, changed and deleted "
                   "since PREV (the column must be carried)")
    p.add_argument("--shard", default="0/1", help="I/N: embed only part I of N (by file and row group); the N outputs in order make the whole (default 0/1)")
    p.add_argument("--resume", action="store_true", help="require committed progress to resume (a rerun resumes by default)")
    p.add_argument("--restart", action="store_true", help="discard committed progress of an earlier run and start over")
    add_reporting_options(p)
    return p


def add_model_options(p: argparse.ArgumentParser, threads_default: str = "one per core") -> None:
    """Options shared with jobs.embed_ray: model, columns, device, batching, cache, output handling."""
    p.add_argument("--model", help="local folder or Hugging Face id in the local cache (default: all-MiniLM-L6-v2)")
    p.add_argument("--text-col", help="column holding the text (default: text)")
    p.add_argument("--text-template", help="build each row's text from several columns, as Python's str.format: "
                   "'{title}\\n\\n{body}'; a null field is empty text, all null gives a null vector (instead of --text-col)")
    p.add_argument("--keep-cols", help="comma-separated columns to carry to the output (default: all but the text column(s); '' for none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto takes CUDA only if it really loads)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="graph precision: fp32 (default), int8 (CPU only) or fp16 (CUDA only)")
    p.add_argument("--pooling", help="override the model's pooling (cls, mean, max, ..., or pooler: the model's pooler_output)")
    p.add_argument("--max-seq-len", type=int, help="truncate texts to this many tokens (default and maximum: the model's)")
    p.add_argument("--max-tokens", type=int, help="padded-token budget per batch: rows x longest row (default: 1024 on CPU, 16384 on CUDA)")
    p.add_argument("--max-batch-size", type=int, default=256, help="most rows in one batch (default 256)")
    p.add_argument("--window-rows", type=int, default=20000, help="rows read, sorted by length and embedded together; bounds memory (default 20000)")
    p.add_argument("--window-mb", type=float, default=16.0, help="a window also ends before its text passes this many "
                   "megabytes (a longer text is a window alone) (default 16)")
    p.add_argument("--no-dedup", dest="dedup", action="store_false", help="embed every row (or chunk) even where "
                   "its window holds the same text already (default: embed it once, copy the vector)")
    p.add_argument("--chunk", action="store_true", help="split texts longer than the model takes into chunks at word "
                   "starts instead of truncating them: one output row per chunk, with chunk, chunk_start, chunk_end")
    p.add_argument("--chunk-tokens", type=int, help="most tokens per chunk, special tokens and prompt included "
                   "(default: --max-seq-len or the model's max_seq_length)")
    p.add_argument("--chunk-overlap", type=int, default=0, help="most tokens a chunk repeats from the one before, "
                   "snapped to a word start (default 0)")
    p.add_argument("--chunk-pooling", choices=CHUNK_POOLINGS, help="one row per text instead: the L2-normalized mean "
                   "or max of its chunks' vectors, or its first chunk's, with a chunks column (implies --chunk)")
    p.add_argument("--prompt", help="prefix for every text, or the name of a prompt in the model's config (default: the model's default prompt, if any)")
    p.add_argument("--truncate-dim", type=int, help="keep the first D dimensions of each vector, L2-normalized again "
                   "(Matryoshka models; default: the model's truncate_dim, if its config has one)")
    p.add_argument("--output-dtype", default="float32", help=f"how vectors are stored: {', '.join(OUTPUT_DTYPES)} "
                   "(int8/uint8: per-dimension ranges from the first window or --calibration, stored in the metadata; "
                   "binary/ubinary: 8 dimensions per byte) (default float32)")
    p.add_argument("--calibration", help="int8/uint8 ranges from this Parquet file's float vectors ('embedding' column) "
                   "instead of the first window")
    p.add_argument("--no-text-key", dest="text_key", action="store_false", help="leave out the 'text_key' column "
                   "(a 128-bit hash of the text the model was given, what a later --reuse matches rows by)")
    p.add_argument("--with-token-counts", action="store_true", help="add 'tokens' (int32: tokens fed to the model) and "
                   "'truncated' (bool) columns before 'embedding'")
    p.add_argument("--cache-dir", type=Path, help="graph cache (default: $EMBEDDER_CACHE or ~/.cache/embedder)")
    p.add_argument("--threads", type=int, help=f"onnxruntime intra-op threads (default: {threads_default})")
    p.add_argument("--metrics-out", type=Path, help="also write the metrics JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (otherwise refused)")


def add_reporting_options(p: argparse.ArgumentParser) -> None:
    """Options shared with jobs.embed_ray: Prometheus output, progress, logging."""
    p.add_argument("--prometheus-out", type=Path, help="write metrics in Prometheus text format (node_exporter textfile collector)")
    p.add_argument("--progress", default="auto", choices=("auto", "on", "off"), help="progress bar on a terminal, log lines otherwise (default auto)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """The flags as given: JobConfig parses their string forms (--keep-cols, --pooling, --shard), for
    embedder.api.embed_parquet too."""
    return JobConfig(
        inputs=args.inputs,
        output=args.out,
        model=args.model,
        text_col=args.text_col,
        text_template=_unescape(args.text_template),
        keep_cols=args.keep_cols,
        device=args.device,
        export=ExportOptions(pooling=args.pooling, precision=args.precision, opset=DEFAULT_OPSET),
        max_seq_len=args.max_seq_len,
        max_tokens=args.max_tokens,
        max_batch_size=args.max_batch_size,
        window_rows=args.window_rows,
        prompt=args.prompt,
        cache_dir=args.cache_dir,
        threads=args.threads,
        metrics_out=args.metrics_out,
        overwrite=args.overwrite,
        progress=args.progress,
        shard=args.shard,
        resume=args.resume,
        restart=args.restart,
        prometheus_out=args.prometheus_out,
        output_options=OutputOptions(truncate_dim=args.truncate_dim, dtype=args.output_dtype, calibration=args.calibration,
                             token_counts=args.with_token_counts, text_key=args.text_key),
        chunking=chunk_options(args.chunk, args.chunk_tokens, args.chunk_overlap, args.chunk_pooling),
        dedup=args.dedup,
        window_mb=args.window_mb,
        reuse=getattr(args, "reuse", None),
        reuse_strict=getattr(args, "reuse_strict", False),
        id_col=getattr(args, "id_col", None),
    )


def _unescape(template: str | None) -> str | None:
    """A shell passes '\\n' as two characters: --text-template reads \\n, \\t and \\\\ as a newline, a tab and a backslash."""
    if template is None:
        return None
    return re.sub(r"\\(n|t|\\)", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], template)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    def embed() -> dict:
        from embedder.run.local import run  # after argument parsing: --help stays instant

        return run(config_from_args(args))

    return run_job("jobs.embed", args, embed)

if __name__ == "__main__":
    sys.exit(main())
