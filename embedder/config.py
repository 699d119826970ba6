"""Validated, frozen configuration objects passed down from jobs/ into the library."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embedder.errors import UsageError
from embedder.model.spec import Pooling

# Graph precisions. Which device kinds run each is the device table's (infer/devices.py): int8 uses
# CPU-only kernels; fp16 is for CUDA (on the CPU onnxruntime casts much of it back to fp32, so it would
# not be the fp16 measured by the gate on a GPU host). Both are gated against fp32 at export.
PRECISIONS = ("fp32", "int8", "fp16")
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportOptions:
    """Choices that change the exported graph (and so are part of its cache key)."""

    pooling: tuple[Pooling, ...] | None = None  # None: the model's own pooling
    normalize: bool = True
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision '{self.precision}' is not supported; valid: {', '.join(PRECISIONS)}")
        if not 14 <= self.opset <= 20:
            raise UsageError(f"opset {self.opset} is outside the supported range 14..20")


def default_cache_dir() -> Path:
    """$EMBEDDER_CACHE, else the user's cache folder."""
    import os

    if os.environ.get("EMBEDDER_CACHE"):
        return Path(os.environ["EMBEDDER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "embedder"


@dataclass(frozen=True)
class JobConfig:
    """Everything one run of the batch job needs, checked once here."""

    inputs: str
    output: Path
    model: str | None = None
    text_col: str = "text"
    keep_cols: tuple[str, ...] | None = None  # None: every column but the text column
    device: str = "auto"
    export: ExportOptions = ExportOptions()
    max_seq_len: int | None = None  # None: the model's max_seq_length
    max_tokens: int | None = None  # padded tokens (rows x longest row) per batch; None: sized for the device
    max_batch_size: int = 256
    window_rows: int = 20000
    prompt: str | None = None  # None: the model's default prompt, if it has one
    cache_dir: Path | None = None
    threads: int | None = None
    metrics_out: Path | None = None
    overwrite: bool = False
    progress: str = "auto"
    shard: tuple[int, int] = (0, 1)  # (index, count): this job embeds part index of count
    resume: bool = False  # insist on resuming committed progress (it is resumed by default anyway)
    restart: bool = False  # discard committed progress
    prometheus_out: Path | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_batch_size", "window_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise UsageError(f"--max-seq-len must be at least 2, got {self.max_seq_len}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if self.progress not in ("auto", "on", "off"):
            raise UsageError(f"--progress must be auto, on or off, got {self.progress}")
        if self.resume and self.restart:
            raise UsageError("--resume and --restart contradict each other; pick one")
        if not self.text_col:
            raise UsageError("--text-col must name a column")
