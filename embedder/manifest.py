"""A cache entry as the rest of the code sees it: its folder, its files' names and its typed manifest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

GRAPH_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """manifest.json of a cache entry, typed where the code reads it.

    `record` is the whole file as written, the figures too (validation, gates, optimization, exporter
    versions), for reports and tests; nothing in the run path reads it by key.
    """

    model: str
    model_hash: str
    precision: str
    pooling: tuple[str, ...]
    dense: tuple[Mapping, ...]  # each layer's in, out and activation, as recorded
    normalize: bool
    dim: int
    max_seq_length: int
    pad_token_id: int
    graphs: Mapping[str, str]  # device kind ("cpu", "cuda") -> graph file
    files: Mapping[str, str]  # file name -> sha256: every file the entry ships
    prompts: Mapping[str, str]
    default_prompt_name: str | None
    include_prompt: bool
    record: Mapping

    @classmethod
    def from_record(cls, record: Mapping) -> Manifest:
        """Parse manifest.json's content; a missing field raises KeyError (an entry from another format)."""
        typed = {f.name: record[f.name] for f in fields(cls) if f.name != "record"}
        typed["pooling"], typed["dense"] = tuple(typed["pooling"]), tuple(typed["dense"])
        typed["prompts"] = typed["prompts"] or {}
        return cls(**typed, record=record)

    def narrowed(self, kind: str, keep: tuple[str, ...] = (TOKENIZER_FILE,)) -> Manifest:
        """The manifest of an entry that ships only kind's graph and `keep` (what a Ray actor needs)."""
        graph = self.graphs[kind]
        files = {name: digest for name, digest in self.files.items() if name in {graph, *keep}}
        record = {**self.record, "graphs": {kind: graph}, "files": files}
        return replace(self, graphs={kind: graph}, files=files, record=record)


@dataclass(frozen=True)
class Artifact:
    """A verified graph in the cache and what its manifest says about it."""

    folder: Path
    manifest: Manifest
    hit: bool

    @property
    def graph_path(self) -> Path:
        """The entry's main graph: the one a CPU runs, or the only one (fp16)."""
        return self.folder / GRAPH_FILE

    @property
    def graphs(self) -> dict[str, Path]:
        """Graph file for each device kind this entry can run on ("cpu", "cuda")."""
        return {kind: self.folder / name for kind, name in self.manifest.graphs.items()}

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / TOKENIZER_FILE
