"""embedder: Parquet text in, normalized sentence vectors out, through an exported ONNX graph."""

from embedder.build.cache import get_or_export
from embedder.config import ExportOptions
from embedder.errors import EmbedderError
from embedder.infer.graph_info import GraphInfo, TensorInfo, read_graph_info
from embedder.manifest import Artifact
from embedder.model.spec import ModelSpec, Pooling, load_spec

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
