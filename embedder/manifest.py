"""A cache entry as the rest of the code sees it: its folder, its files' names and its manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GRAPH_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    """A verified graph in the cache and what its manifest says about it."""

    folder: Path
    manifest: dict
    hit: bool

    @property
    def graph_path(self) -> Path:
        """The entry's main graph: the one a CPU runs, or the only one (fp16)."""
        return self.folder / GRAPH_FILE

    @property
    def graphs(self) -> dict[str, Path]:
        """Graph file for each device kind this entry can run on ("cpu", "cuda")."""
        return {kind: self.folder / name for kind, name in self.manifest["graphs"].items()}

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / TOKENIZER_FILE
