"""Read an ONNX graph's declared inputs and outputs: names, element types, shapes with symbolic axes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from embedder.errors import InputError


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output as declared: a dim is an int, an axis name, or None if unnamed."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def __str__(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}  {self.dtype}  [{dims}]"


@dataclass(frozen=True)
class GraphInfo:
    """A graph's interface: what a caller must feed and what it gets back."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opset: int | None

    def to_dict(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "opset": self.opset,
        }


def _tensor_info(value) -> TensorInfo:
    import numpy as np
    from onnx import helper

    tensor_type = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    except (KeyError, TypeError):
        dtype = f"onnx-type-{tensor_type.elem_type}"
    shape: list[int | str | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            shape.append(dim.dim_param)
        else:
            shape.append(None)
    return TensorInfo(value.name, dtype, tuple(shape))


def read_graph_info(path: str | Path) -> GraphInfo:
    """Inputs and outputs of any ONNX file, without loading its weights."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for a non-ONNX file
        raise InputError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from e
    if not model.HasField("graph"):
        # protobuf parses empty or unrelated bytes as an empty ModelProto without complaint.
        raise InputError(f"{path}: not an ONNX model (no graph in the file)")
    # Old exporters list initializers among the inputs; a caller never feeds those.
    initializers = {init.name for init in model.graph.initializer}
    inputs = tuple(_tensor_info(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_tensor_info(v) for v in model.graph.output)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return GraphInfo(inputs, outputs, opset)
