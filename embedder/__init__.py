"""embedder: Parquet text in, normalized sentence vectors out, through an exported ONNX graph.

The public names load on first use (PEP 562 module __getattr__): `import embedder` imports none of pyarrow,
onnxruntime, polars or torch, so a program pays only for what it touches.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Each public name and the module that defines it. No import of them here, not even a type-only one: run/
# imports this package for __version__, and the layer contract would read that as run reaching up to api.
_EXPORTS = {
    "Embedder": "embedder.api",
    "embed_parquet": "embedder.api",
    "Artifact": "embedder.manifest",
    "EmbedderError": "embedder.errors",
    "ExportOptions": "embedder.config",
    "GraphInfo": "embedder.infer.graph_info",
    "TensorInfo": "embedder.infer.graph_info",
    "read_graph_info": "embedder.infer.graph_info",
    "ModelSpec": "embedder.model.spec",
    "Pooling": "embedder.model.spec",
    "load_spec": "embedder.model.spec",
    "get_or_export": "embedder.build.cache",
}

__all__ = [
    "Artifact",
    "Embedder",
    "EmbedderError",
    "ExportOptions",
    "GraphInfo",
    "ModelSpec",
    "Pooling",
    "TensorInfo",
    "__version__",
    "embed_parquet",
    "get_or_export",
    "load_spec",
    "read_graph_info",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'embedder' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
