"""embedder: Parquet text in, normalized sentence vectors out, through an exported ONNX graph."""

from embedder.cache import Artifact, get_or_export
from embedder.config import ExportOptions
from embedder.errors import EmbedderError
from embedder.graph import GraphInfo, TensorInfo, read_graph_info
from embedder.spec import ModelSpec, Pooling, load_spec

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "EmbedderError",
    "ExportOptions",
    "GraphInfo",
    "ModelSpec",
    "Pooling",
    "TensorInfo",
    "__version__",
    "get_or_export",
    "load_spec",
    "read_graph_info",
]
