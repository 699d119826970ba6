"""What a run did and how fast: counters and stage timers, filled by every layer that does the work."""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field

STAGES = ("model", "read", "tokenize", "infer", "write")


@dataclass
class Metrics:
    """What a job did and how fast; every figure is counted, none estimated."""

    rows: int = 0
    null_rows: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    truncated_rows: int = 0
    windows: int = 0
    resumed_rows: int = 0  # rows committed by an earlier, interrupted run and not redone
    output_rows: int = 0
    chunks: int = 0  # --chunk: chunks embedded
    chunked_rows: int = 0  # --chunk: texts split into more than one chunk
    cut_in_word: int = 0  # --chunk: boundaries put inside a word that was longer than a chunk
    deduplicated: int = 0  # rows or chunks whose vector was copied from an identical one in their window
    reused_rows: int = 0  # --reuse: rows (or chunks) whose vector was taken from the previous output
    provider: str = ""
    device: str = ""
    cache_hit: bool | None = None
    batching: dict = field(default_factory=dict)  # the effective window, token budget and batch cap
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] += time.perf_counter() - start

    def to_dict(self) -> dict:
        wall = time.perf_counter() - self.started
        embedded = self.rows - self.null_rows
        return {
            "rows": self.rows,
            "null_rows": self.null_rows,
            "embedded_rows": embedded,
            "truncated_rows": self.truncated_rows,
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "padding_efficiency": self.real_tokens / self.padded_tokens if self.padded_tokens else None,
            "batches": self.batches,
            "windows": self.windows,
            "resumed_rows": self.resumed_rows,
            "output_rows": self.output_rows,
            "chunks": self.chunks,
            "chunked_rows": self.chunked_rows,
            "cut_in_word": self.cut_in_word,
            "deduplicated": self.deduplicated,
            "reused_rows": self.reused_rows,
            "wall_seconds": round(wall, 4),
            "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
            "rows_per_second": round(self.rows / wall, 2) if wall > 0 else None,
            "tokens_per_second": round(self.real_tokens / wall, 2) if wall > 0 else None,
            "provider": self.provider,
            "device": self.device,
            "cache_hit": self.cache_hit,
            "batching": self.batching,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary_line(metrics: dict) -> str:
    efficiency = metrics["padding_efficiency"]
    return (
        f"{metrics['rows']} rows ({metrics['null_rows']} null, {metrics['truncated_rows']} truncated) in "
        f"{metrics['wall_seconds']:.1f} s: {metrics['rows_per_second'] or 0:.1f} rows/s, "
        f"{metrics['tokens_per_second'] or 0:.0f} tokens/s, padding efficiency "
        f"{'n/a' if efficiency is None else f'{efficiency:.3f}'}, {metrics['device']}, "
        f"peak RSS {metrics['peak_rss_mb']:.0f} MB"
    )
