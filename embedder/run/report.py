"""How a run reports: a progress bar or periodic log lines, and its figures in Prometheus text format."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from embedder.io.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)


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
    escaped = output.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # the format's three escapes
    label = '{output="%s"}' % escaped
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
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())
