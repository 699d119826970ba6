"""Shared command-line plumbing: logging set-up and mapping errors to one line and an exit code."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

from embedder.errors import EXIT_RUNTIME, EmbedderError

EXIT_INTERRUPTED = 130


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # transformers and huggingface_hub log at INFO/WARNING about things the job already handles.
    for noisy in ("transformers", "huggingface_hub", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for chatty in ("botocore", "boto3", "s3transfer", "urllib3", "azure"):  # "Found credentials in ...", per request
        logging.getLogger(chatty).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_onnxruntime_tools)


def _quiet_onnxruntime_tools(record: logging.LogRecord) -> bool:
    """Drop what onnxruntime's offline optimizer and quantizer say below ERROR.

    They log each fusion, each pass and, through the root logger, a pre-processing hint once per
    quantized trial: dozens of lines per export. The export logs and records the outcome itself
    (fused operators, kept nodes, gate figures in the manifest).
    """
    path = record.pathname.replace("\\", "/")
    tool = "/onnxruntime/transformers/" in path or "/onnxruntime/quantization/" in path
    return record.levelno >= logging.ERROR or not tool


def run_job(prog: str, args, produce_metrics: Callable[[], dict]) -> int:
    """Run a job; print its metrics JSON as the last stdout line; write the Prometheus file if asked.

    The Prometheus file is written on failure too, with the exit code, so an alert can fire on it.
    """
    outcome: dict = {}

    def job() -> int:
        outcome["metrics"] = produce_metrics()
        print(json.dumps(outcome["metrics"], sort_keys=True), flush=True)
        return 0

    code = run_main(prog, job)
    if args.prometheus_out:
        from embedder.run.report import write_prometheus

        try:
            write_prometheus(args.prometheus_out, str(args.out), code, outcome.get("metrics"))
        except OSError as e:
            print(f"{prog}: warning: cannot write {args.prometheus_out}: {e}", file=sys.stderr)
    return code


def run_main(prog: str, main: Callable[[], int]) -> int:
    """Run main; an EmbedderError becomes one line on stderr and its exit code, never a traceback."""
    try:
        return main()
    except EmbedderError as e:
        # One line, always: some library messages (pyarrow's) span several.
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print(f"{prog}: error: out of memory; lower --window-rows or --max-tokens", file=sys.stderr)
        return EXIT_RUNTIME
