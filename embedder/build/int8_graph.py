"""The int8 rewrite of a graph's weight MatMuls: activations scaled per token, each text's first token in fp32.

onnxruntime's dynamic quantization gives a whole batch one activation scale, so one token's outliers coarsen
every other token's rounding. Here each token's activations get their own scale (max |x| / 127, u8 about
128), and the products are onnxruntime's fused u8 x s8 MatMulIntegerToFloat with one weight scale per output
column, then one multiply by the token's scale.

The first token of each text stays in fp32. In BERT-family encoders it ([CLS], <s>) is an attention sink that
carries one massive channel: in every layer of all-MiniLM-L6-v2, channel 99 holds nearly all of its norm (max
/ rms about 19, of at most 19.6). Its own scale then rounds its other channels to zero, and attention carries
the error of its value projection to every token. Measured on the export gate's texts, every weight MatMul
int8 (scripts/bench_int8.py): per token with the first token in int8, min cosine 0.979 on the multilingual
mix; with it in fp32, 0.996; onnxruntime's per-batch scale, 0.967.

Per input x that chosen MatMuls share, for x of shape [batch, tokens, hidden] (a 2-D input, one row per text
as a Dense layer after pooling takes, has no first token to split off):
    m = max(max(x), -min(x)) per token; q = QuantizeLinear(x / m, 1/127, 128)[:, 1:]
    per MatMul: Concat(x[:, :1] @ W, MatMulIntegerToFloat(q, W8, 1/127, w_scale, 128) * m[:, 1:])
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

INT8_FORMAT = 2  # in int8 cache keys; 2: this rewrite (1 was onnxruntime's quantize_dynamic)
METHOD = ("int8 per token: u8 activations with one scale per token, s8 weights with one scale per output column "
          "(onnxruntime MatMulIntegerToFloat), each text's first token in fp32")

_LARGE = 2**62  # a Slice end past any sequence


def quantize_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s8 values, one fp32 scale per output column) of a [in, out] weight matrix, symmetric."""
    scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def round_trip(x: np.ndarray, first_token_apart: bool) -> np.ndarray:
    """x ([..., hidden]) as the rewritten graph's activations see it: rounded to its per-token int8 grid, the
    first token of each text (axis -2, where first_token_apart) left exact."""
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12) / 127
    rounded = np.clip(np.round(x / scale), -127, 127) * scale
    if first_token_apart:
        rounded[..., 0, :] = x[..., 0, :]
    return rounded


def rewrite_int8(src: Path, dst: Path, nodes: Sequence[str], token_level: Collection[str]) -> None:
    """Write src with these weight MatMuls in int8 to dst. token_level: the MatMul inputs shaped [batch, tokens,
    hidden], whose first token stays fp32 (known from a run: the exported graphs' shapes are symbolic)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    weights = {t.name: t for t in graph.initializer}
    shared: dict[str, list] = {}
    chosen = set(nodes)
    for node in graph.node:
        if node.name in chosen:
            shared.setdefault(node.input[0], []).append(node)
    added = [numpy_helper.from_array(np.array(value, dtype), name) for name, value, dtype in (
        ("i8_step", 1 / 127, np.float32), ("i8_tiny", 1e-12, np.float32),
        ("i8_zero_point", 128, np.uint8), ("i8_last_axis", [-1], np.int64), ("i8_0", [0], np.int64),
        ("i8_1", [1], np.int64), ("i8_end", [_LARGE], np.int64))]

    def reduce(op: str, x: str, out: str):
        if opset < 18:
            return helper.make_node(op, [x], [out], axes=[-1], keepdims=1)
        return helper.make_node(op, [x, "i8_last_axis"], [out], keepdims=1)

    replacement: dict[str, list] = {}
    for index, (x, members) in enumerate(shared.items()):
        p = f"i8_{index}_"
        split = x in token_level
        # max |x| from the two reductions: no |x| tensor written and read back.
        prelude = [reduce("ReduceMax", x, p + "high"), reduce("ReduceMin", x, p + "low"),
                   helper.make_node("Neg", [p + "low"], [p + "minus_low"]),
                   helper.make_node("Max", [p + "high", p + "minus_low"], [p + "raw_max"]),
                   helper.make_node("Max", [p + "raw_max", "i8_tiny"], [p + "scale"]),  # an all-zero token
                   # x / max|x| on the grid of 1/127: the 127 lives in the constant scales, not in an op.
                   helper.make_node("Div", [x, p + "scale"], [p + "scaled"]),
                   helper.make_node("QuantizeLinear", [p + "scaled", "i8_step", "i8_zero_point"], [p + "q"])]
        q, scale = p + "q", p + "scale"
        if split:
            prelude += [helper.make_node("Slice", [p + "q", "i8_1", "i8_end", "i8_1"], [p + "q_rest"]),
                        helper.make_node("Slice", [p + "scale", "i8_1", "i8_end", "i8_1"], [p + "scale_rest"]),
                        helper.make_node("Slice", [x, "i8_0", "i8_1", "i8_1"], [p + "first"])]
            q, scale = p + "q_rest", p + "scale_rest"
        for j, node in enumerate(members):
            w8, w_scale = quantize_weights(numpy_helper.to_array(weights[node.input[1]]).astype(np.float32))
            name = f"{p}{j}_"
            added += [numpy_helper.from_array(w8, name + "w"), numpy_helper.from_array(w_scale, name + "w_scale")]
            scaled = name + "rest" if split else node.output[0]
            replacement[node.name] = (prelude if j == 0 else []) + [
                helper.make_node("MatMulIntegerToFloat", [q, name + "w", "i8_step", name + "w_scale", "i8_zero_point"],
                                 [name + "y"], domain="com.microsoft"),
                helper.make_node("Mul", [name + "y", scale], [scaled])]
            if split:
                replacement[node.name] += [helper.make_node("MatMul", [p + "first", node.input[1]], [name + "first"]),
                                           helper.make_node("Concat", [name + "first", scaled], [node.output[0]], axis=1)]
    rewritten = [new for node in graph.node for new in replacement.get(node.name, [node])]
    del graph.node[:]
    graph.node.extend(rewritten)
    read = {name for node in graph.node for name in node.input}
    kept = [t for t in [*graph.initializer, *added] if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
