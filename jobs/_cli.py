"""Shared command-line plumbing: logging set-up and mapping errors to one line and an exit code."""

from __future__ import annotations

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
