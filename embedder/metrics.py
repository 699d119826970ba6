"""Counters, stage timers, progress reporting and the metrics JSON a job leaves behind."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

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


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


class Progress:
    """A tqdm bar on a terminal; a log line every `interval` seconds otherwise (cron, Airflow)."""

    def __init__(self, total: int, mode: str = "auto", interval: float = 30.0, initial: int = 0):
        self.total, self.done, self.interval = total, initial, interval
        use_bar = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self._log = mode == "auto" and not use_bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="rows", dynamic_ncols=True, smoothing=0.1)
        self._start = self._last = time.perf_counter()

    def update(self, rows: int) -> None:
        self.done += rows
        if self._bar is not None:
            self._bar.update(rows)
        elif self._log and time.perf_counter() - self._last >= self.interval:
            self._last = time.perf_counter()
            rate = self.done / max(self._last - self._start, 1e-9)
            logger.info("progress: %d/%d rows (%.1f%%), %.1f rows/s", self.done, self.total,
                        100 * self.done / max(self.total, 1), rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# Prometheus text format for node_exporter's textfile collector: name, help, and the metrics key.
_PROMETHEUS = (
    ("embedder_rows", "Rows embedded by this run", "rows"),
    ("embedder_null_rows", "Rows with null text (null vectors)", "null_rows"),
    ("embedder_output_rows", "Rows in the output file", "output_rows"),
    ("embedder_real_tokens", "Tokens of the rows, specials included", "real_tokens"),
    ("embedder_padded_tokens", "Tokens fed to the graph, padding included", "padded_tokens"),
    ("embedder_padding_efficiency", "Real over padded tokens", "padding_efficiency"),
    ("embedder_wall_seconds", "Wall time of the run", "wall_seconds"),
    ("embedder_rows_per_second", "Rows per wall second", "rows_per_second"),
    ("embedder_tokens_per_second", "Real tokens per wall second", "tokens_per_second"),
    ("embedder_peak_rss_megabytes", "Peak resident memory", "peak_rss_mb"),
)


def write_prometheus(path: Path, output: str, exit_code: int, metrics: dict | None) -> None:
    """Write the run's figures atomically (the collector must never read a half-written file)."""
    label = '{output="%s"}' % output.replace("\\", "\\\\").replace('"', '\\"')
    lines = [
        "# HELP embedder_last_exit_code Exit code of the last run (0 success)",
        "# TYPE embedder_last_exit_code gauge",
        f"embedder_last_exit_code{label} {exit_code}",
        "# HELP embedder_last_run_timestamp_seconds When the last run ended",
        "# TYPE embedder_last_run_timestamp_seconds gauge",
        f"embedder_last_run_timestamp_seconds{label} {time.time():.3f}",
    ]
    for name, help_text, key in _PROMETHEUS if metrics else ():
        value = metrics.get(key)
        if value is not None:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{label} {value}"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
