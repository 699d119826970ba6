"""fp16 graphs for CUDA: the transformer in half precision, pooling and normalization in fp32, gated
against the fp32 graph on real text.

The sentence vector is an average (or max) over up to max_seq_length token vectors followed by an L2
norm: in fp16 those sums lose digits that the rest of the graph does not, so the nodes the export
wrapper adds after the transformer keep fp32, with casts at the boundary. Inputs and the output stay
as in the fp32 graph (int64 ids, float32 vectors), so the runner does not change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedder.build.gate import row_cosines
from embedder.errors import ExportError

logger = logging.getLogger(__name__)

MIN_COSINE = 0.999
_TRANSFORMER_SCOPE = "/transformer/"  # node names the TorchScript exporter gives the Hugging Face module


def pooling_nodes(graph) -> list[str]:
    """Nodes the export wrapper added after the transformer: pooling, Dense, normalize.

    The exporter names nodes by module scope ("/transformer/...", "/dense.0/...", "/ReduceSum");
    nodes the offline optimizer fused get names of its own without a leading "/". Casts are left out:
    onnxruntime's converter already keeps integer-to-float casts as they are, and blocking one made
    it insert the same boundary cast twice.
    """
    return [n.name for n in graph.node
            if n.name.startswith("/") and not n.name.startswith(_TRANSFORMER_SCOPE) and n.op_type != "Cast"]


def _drop_duplicate_nodes(graph) -> None:
    # onnxruntime's float16 converter can emit one boundary Cast once per consumer, identical in
    # name, input and output; an ONNX graph may hold each node once.
    seen: set[bytes] = set()
    unique = []
    for node in graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            unique.append(node)
    del graph.node[:]
    graph.node.extend(unique)


def convert_fp16(source: Path, target: Path, embed: Callable[[Path, str], tuple[np.ndarray, str]],
                 min_cosine: float | None = None) -> dict:
    """Write the fp16 version of source to target if it passes the gate; return the manifest figures.

    embed(path, kind) runs a graph on the gate texts on that device kind ("cpu", "cuda"; the CPU where
    the kind does not load) and returns (vectors, the provider that ran).
    The gate runs on CUDA where it works here, else on the CPU, where onnxruntime computes some fp16
    nodes in fp32: the manifest says which. min_cosine defaults to MIN_COSINE.
    """
    min_cosine = MIN_COSINE if min_cosine is None else min_cosine
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(source)))
    kept = pooling_nodes(model.model.graph)
    model.convert_float_to_float16(keep_io_types=True, node_block_list=kept)
    _drop_duplicate_nodes(model.model.graph)
    trial = target.with_name("fp16-trial.onnx")
    try:
        model.save_model_to_file(str(trial))
        onnx.checker.check_model(str(trial))
        reference, _ = embed(source, "cpu")
        candidate, provider = embed(trial, "cuda")  # on the CPU where CUDA does not load here
        cosines = row_cosines(candidate, reference)
        if cosines.min() < min_cosine:
            raise ExportError(f"fp16 graph fails its gate: min cosine {cosines.min():.5f} against fp32 on "
                              f"{len(cosines)} texts (limit {min_cosine}); use --precision fp32")
        trial.replace(target)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"fp16 conversion failed: {type(e).__name__}: {e}") from e
    finally:
        trial.unlink(missing_ok=True)
    figures = {
        "method": "onnxruntime float16 conversion; pooling, Dense and normalize nodes kept fp32",
        "fp32_nodes": kept,
        "gate": {"texts": len(cosines), "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()),
                 "threshold": min_cosine, "against": "the fp32 graph", "provider": provider},
    }
    logger.info("fp16: gate min cosine %.6f on %s (%d nodes kept fp32)", cosines.min(), provider, len(kept))
    return figures

