"""Validated, frozen configuration objects passed down from jobs/ into the library."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embedder.errors import UsageError
from embedder.spec import Pooling

PRECISIONS = ("fp32",)
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
