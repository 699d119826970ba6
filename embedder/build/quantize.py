"""int8 graphs for the CPU that keep quality: dynamic int8 with per-channel weights, sensitive
MatMuls left in fp32, and a gate against the fp32 graph on real text.

Quantizing every MatMul of all-MiniLM-L6-v2 dropped some rows to cosine 0.98 against fp32: the
error comes mostly from a few layers (the feed-forward output of the first layers, where GELU
activations have outliers). Each MatMul's own error is measured on the gate texts, the worst are
kept in fp32 until the rest fit the budget, and the result must pass the gate or the export refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedder.build.gate import row_cosines
from embedder.errors import ExportError

logger = logging.getLogger(__name__)

MIN_COSINE = 0.99
# Aim well inside the gate: errors of separate nodes roughly add up, and other text than the gate's
# can be harder (on 10,000 docstrings the first version, aimed at 0.995, measured 0.9897).
_BUDGET_FRACTION = 0.25


def quantize_int8(graph_path: Path, embed: Callable[[Path], np.ndarray], min_cosine: float | None = None) -> dict:
    """Replace graph_path by a gated int8 graph; return the figures for the manifest.

    embed(path) runs a graph on the gate texts and returns their vectors; min_cosine defaults to MIN_COSINE.
    """
    min_cosine = MIN_COSINE if min_cosine is None else min_cosine
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reference = embed(graph_path)
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    # MatMuls against a weight matrix: the activation-by-activation ones inside attention (scores,
    # context) would need both sides quantized on the fly, for little speed and more error.
    candidates = [n.name for n in graph.node
                  if n.op_type == "Attention" or (n.op_type == "MatMul" and n.input[1] in weights)]
    trial = graph_path.with_name("int8-trial.onnx")

    def quantized(nodes: list[str]) -> np.ndarray:
        quantize_dynamic(str(graph_path), str(trial), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_quantize=nodes,
                         # Fused contrib ops hide some tensor types from shape inference.
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return embed(trial)

    try:
        errors = {}
        logger.info("int8: measuring each of %d MatMuls quantized alone on %d gate texts (a few seconds each)",
                    len(candidates), len(reference))
        for done, node in enumerate(candidates, 1):
            errors[node] = float(1 - row_cosines(quantized([node]), reference).min())
            if done % 10 == 0:
                logger.info("int8: %d of %d MatMuls measured", done, len(candidates))
        ranked = sorted(candidates, key=lambda n: errors[n], reverse=True)
        budget = (1 - min_cosine) * _BUDGET_FRACTION
        excluded: list[str] = []
        while ranked[len(excluded):] and sum(errors[n] for n in ranked[len(excluded):]) > budget:
            excluded.append(ranked[len(excluded)])
        while True:
            kept = [n for n in candidates if n not in excluded]
            if not kept:
                raise ExportError(f"int8 quantization cannot reach min cosine {min_cosine} against fp32 even "
                                  "with one MatMul quantized; use --precision fp32")
            cosines = row_cosines(quantized(kept), reference)
            if cosines.min() >= min_cosine:
                break
            logger.info("int8 gate: min cosine %.5f < %.3f with %d nodes in fp32; keeping one more in fp32",
                        cosines.min(), min_cosine, len(excluded))
            excluded.append(ranked[len(excluded)])
        trial.replace(graph_path)
    finally:
        trial.unlink(missing_ok=True)
    figures = {
        "method": "dynamic int8, per-channel symmetric weights, per-tensor activations (onnxruntime quantize_dynamic)",
        "quantized_nodes": len(kept),
        "fp32_nodes": excluded,
        "gate": {"texts": len(reference), "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()),
                 "threshold": min_cosine, "against": "the fp32 graph"},
    }
    logger.info("int8: %d of %d MatMuls quantized; gate min cosine %.5f (mean %.5f)", len(kept), len(candidates),
                cosines.min(), cosines.mean())
    return figures
