"""Validated, frozen configuration objects passed down from jobs/ into the library."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from embedder.errors import UsageError
from embedder.model.spec import Pooling, parse_pooling

# Graph precisions. Which device kinds run each is the device table's (infer/devices.py): int8 uses
# CPU-only kernels; fp16 is for CUDA (on the CPU onnxruntime casts much of it back to fp32, so it would
# not be the fp16 measured by the gate on a GPU host). Both are gated against fp32 at export.
PRECISIONS = ("fp32", "int8", "fp16")
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportOptions:
    """Choices that change the exported graph (and so are part of its cache key)."""

    # None: the model's own pooling. The --pooling string ("cls+mean") is parsed here, so the command line
    # and the Python API cannot read it differently.
    pooling: tuple[Pooling, ...] | str | None = None
    normalize: bool = True
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        object.__setattr__(self, "pooling", parse_pooling(self.pooling) if self.pooling else None)
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

    inputs: str  # a file, folder or glob; a local path or a URI (s3://)
    output: str  # a file, or a folder of parts where it ends in '/'; a local path or a URI
    model: str | None = None
    text_col: str = "text"
    keep_cols: tuple[str, ...] | str | None = None  # None: every column but the text column; "a,b" as --keep-cols
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
    shard: tuple[int, int] | str = (0, 1)  # (index, count) or "I/N": this job embeds part index of count
    resume: bool = False  # insist on resuming committed progress (it is resumed by default anyway)
    restart: bool = False  # discard committed progress
    prometheus_out: Path | None = None

    def __post_init__(self) -> None:
        # The command line's string forms are parsed here, once for every caller (jobs/, embedder.api).
        object.__setattr__(self, "inputs", _location(self.inputs, "--in"))
        object.__setattr__(self, "output", _location(self.output, "--out"))
        if self.keep_cols is not None:
            object.__setattr__(self, "keep_cols", parse_columns(self.keep_cols))
        object.__setattr__(self, "shard", parse_shard(self.shard))
        check_embedding_options(self.max_seq_len, self.max_tokens, self.max_batch_size, self.window_rows, self.threads)
        if self.progress not in ("auto", "on", "off"):
            raise UsageError(f"--progress must be auto, on or off, got {self.progress}")
        if self.resume and self.restart:
            raise UsageError("--resume and --restart contradict each other; pick one")
        if not self.text_col:
            raise UsageError("--text-col must name a column")


def _location(value, flag: str) -> str:
    """A path or URI as given (a trailing '/' is meaningful); a PathLike becomes its string."""
    import os

    text = os.fspath(value) if not isinstance(value, str) else value
    if not text:
        raise UsageError(f"{flag} must name a file, folder or URI")
    return text


def check_embedding_options(max_seq_len: int | None, max_tokens: int | None, max_batch_size: int, window_rows: int,
                            threads: int | None) -> None:
    """Refuse limits no run can use; the job and embedder.api.Embedder share them (messages name the flags)."""
    for name, value in (("max_tokens", max_tokens), ("max_batch_size", max_batch_size), ("window_rows", window_rows),
                        ("threads", threads)):
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if max_seq_len is not None and max_seq_len < 2:
        raise UsageError(f"--max-seq-len must be at least 2, got {max_seq_len}")


def parse_columns(value: str | Iterable[str]) -> tuple[str, ...]:
    """Column names: "a,b" as --keep-cols takes them ('' for none), or any iterable of names."""
    if isinstance(value, str):
        return tuple(c.strip() for c in value.split(",") if c.strip())
    return tuple(value)


def parse_shard(value: str | tuple[int, int]) -> tuple[int, int]:
    """'I/N' or (I, N) -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(x) for x in (value.split("/") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise UsageError(f"--shard {value}: expected I/N, for example 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {index}/{count}: need 0 <= I < N")
    return index, count
