"""python -m jobs.export --model M: export and validate a model's graph, print its manifest."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from embedder.build.cache import get_or_export
from embedder.config import PRECISIONS, ExportOptions, default_cache_dir
from embedder.model.spec import load_spec
from jobs._cli import run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.export",
        description="Export a model's sentence-embedding pipeline to ONNX (or reuse the cached graph), "
        "validate it against PyTorch, and print its manifest as JSON.",
    )
    parser.add_argument("--model", help="local folder or Hugging Face id in the local cache (default: all-MiniLM-L6-v2)")
    parser.add_argument("--cache-dir", type=Path, help="graph cache (default: $EMBEDDER_CACHE or ~/.cache/embedder)")
    parser.add_argument(
        "--pooling",
        help="override the model's pooling: cls, mean, max, mean_sqrt_len_tokens, weightedmean, lasttoken, "
        "or pooler (the model's pooler_output, a different vector from sentence-transformers'); join with +",
    )
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32; int8 for the CPU or fp16 for CUDA, each gated against fp32 on real text "
                             "(min cosine 0.99 and 0.999) or refused")
    parser.add_argument("--no-normalize", action="store_true", help="do not L2-normalize the output vectors")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)

    def export() -> int:
        # The same options object the job builds, so both read --pooling alike and share the cache entry.
        options = ExportOptions(pooling=args.pooling, normalize=not args.no_normalize, precision=args.precision)
        spec = load_spec(args.model, options.pooling)
        artifact = get_or_export(spec, options, args.cache_dir or default_cache_dir())
        print(json.dumps({"cache_hit": artifact.hit, "folder": str(artifact.folder), **artifact.manifest.record}, indent=2))
        return 0

    return run_main("jobs.export", export)


if __name__ == "__main__":
    sys.exit(main())
