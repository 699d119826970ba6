"""The int8 rewrite of a graph's weight MatMuls, with one of two recipes for what int8 rounds badly, chosen by
the kind of CPU that exports (recipe_for).

onnxruntime's dynamic quantization gives a whole batch one activation scale, so one token's outliers coarsen
every other token's rounding. A scale per token avoids that (max |x| / 127, u8 about 128): the products are
onnxruntime's fused u8 x s8 MatMulIntegerToFloat with one weight scale per output column, then one multiply
by the token's scale.

What rounds badly: in BERT-family encoders the first token ([CLS], <s>) is an attention sink that carries one
massive channel (all-MiniLM-L6-v2: channel 99, max / rms about 19 in every layer's LayerNorm outputs; after
GELU, one channel at 14-25 where the other tokens have about 0). Its own scale then rounds its other channels to
zero, and attention carries the error to every token. Per token alone, min cosine 0.983 on the gate's
multilingual mix. The recipes, all 36 MatMuls int8 (scripts/bench_int8.py --rows 1000; gate figures are
docstrings / short sentences / multilingual mix; "VNNI without AMX" is the Xeon below with AMX masked by
scripts/as_cpu.py, the int8 kernels of Zen 4/5 and Ice Lake Xeons, on Sapphire Rapids cores):
- FIRST_TOKEN_FP32: a scale per token, each text's first token through the fp32 weights. Gate 0.9985 /
  0.9979 / 0.9976; 1.69-1.79x fp32 on AVX-512 VNNI with AMX (Xeon, Sapphire Rapids, 2 threads), 1.44-1.46x on
  VNNI without AMX, 1.25-1.34x on AVX2 (Zen 3; 1.30-1.32x on that Xeon masked to AVX2).
- SMOOTHED: SmoothQuant (Xiao et al., 2022): each input channel scaled by c, the weights' rows by 1/c, which
  moves part of an outlier channel's range into the weights; every token int8. Smoothed, one activation scale
  per batch is enough (onnxruntime's DynamicQuantizeLinear, whose scale is computed once per shared input and
  whose bias Add goes into the product), except at down-projections (batch_scaled). At alpha 0.6, 2.11x fp32
  on VNNI with AMX, 1.80x on VNNI without it, gate 0.998 / 0.9965 / 0.9936; with a scale per token
  everywhere (the recipe before), 1.67x and 1.59x, 0.9973 / 0.9968 / 0.9944.
  Not on AVX2: smoothed activations fill the u8 range, and vpmaddubsw's int16 pair sums then saturate (gate
  0.976 on Zen 3 for a scale per token; 0.947 with batch scales at alpha 0.6, masked; 7-bit weights avoid it but fall
  to 0.991).
Fewer fp32 first tokens do not pay on AVX2: on AVX2's int8 kernels (exact in their int8 products;
scripts/gate_vectors.py --calibration, as scripts/bench_int8.py --avx2-gate runs the gate), the first token in
fp32 only where a MatMul reads a LayerNorm output calibrates at 0.9937 on the multilingual mix (0.9972 on
VNNI), so the export would keep MatMuls in fp32 there; at every MatMul, 0.9956. Nor do 7-bit activations (u8
1..127, which cannot saturate) with smoothing and every token int8: 1.39x on the Xeon masked to AVX2, gate mix
0.982-0.986 at alpha 0.6-0.7. u8 weights (u8 x u8 products, which MLAS widens to int16 on AVX2, exact) ran
1.13x there.

Per input x that chosen MatMuls share (first token apart only for x of shape [batch, tokens, hidden]; a 2-D
input, one row per text as a Dense layer after pooling takes, has none):
    xs = x * c (smoothed); m = max(max(xs), -min(xs)) per token; q = QuantizeLinear(xs / m, 1/127, 128)
    per MatMul: MatMulIntegerToFloat(q, W8, 1/127, w_scale, 128) * m, W8 from W / c
    first token apart: q and m without the first token, and Concat(x[:, :1] @ W, that) along the tokens
    per batch: q, step, zero = DynamicQuantizeLinear(xs); per MatMul MatMulIntegerToFloat(q, W8, step,
    w_scale, zero, bias) in place of the MatMul and its bias Add
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# In int8 cache keys. 4: smoothed with batch scales; 3: the recipes; 2: per token, first token fp32; 1: quantize_dynamic
INT8_FORMAT = 4

_LARGE = 2**62  # a Slice end past any sequence


@dataclass(frozen=True)
class Recipe:
    """What the rewrite does about the values int8 rounds badly (the module's figures)."""

    name: str
    first_token_fp32: bool
    smoothed: bool
    method: str  # for the manifest
    per_batch: bool = False  # one activation scale per batch where batch_scaled says so


FIRST_TOKEN_FP32 = Recipe("first-token-fp32", True, False,
                          "int8 per token: u8 activations with one scale per token, s8 weights with one scale per "
                          "output column (onnxruntime MatMulIntegerToFloat), each text's first token in fp32")
SMOOTHED = Recipe("smoothed-batch", False, True,
                  "int8 smoothed: activation channels scaled into the weights (SmoothQuant), u8 activations with "
                  "one scale per batch (onnxruntime DynamicQuantizeLinear) except at down-projections (one scale per "
                  "token), s8 weights with one scale per output column (MatMulIntegerToFloat), every token int8",
                  per_batch=True)
# Tried in turn at export, the best on calibration kept: 0.5 is SmoothQuant's default. all-MiniLM-L6-v2's
# calibration min cosine at 0.6 / 0.7 / 0.8: 0.9959 / 0.9943 / 0.978 (0.5: gate mix 0.991 against 0.993 at 0.6).
SMOOTHING_ALPHAS = (0.5, 0.6, 0.7)


def recipe_for(isa_kind: str) -> Recipe:
    """SMOOTHED where u8 x s8 products accumulate in int32 in one instruction (VNNI), else FIRST_TOKEN_FP32."""
    return SMOOTHED if isa_kind in ("avx512-vnni", "avx-vnni") else FIRST_TOKEN_FP32


def batch_scaled(inputs: Mapping[str, Sequence[np.ndarray]]) -> set[str]:
    """The inputs (name -> weights of the MatMuls reading it) to quantize with one scale per batch: all but those
    of down-projections (more rows than columns, the FFN's output projection), which read an activation's
    output (GELU), heavy-tailed per token: with one batch scale there too, all-MiniLM-L6-v2's gate mix read
    0.990, against 0.997 with those products left in fp32."""
    return {x for x, ws in inputs.items() if all(w.shape[0] <= w.shape[1] for w in ws)}


def quantize_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s8 values, one fp32 scale per output column) of a [in, out] weight matrix, symmetric."""
    scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def round_trip(x: np.ndarray, first_token_apart: bool, per_batch: bool = False) -> np.ndarray:
    """x ([..., hidden]) as the rewritten graph's activations see it: rounded to its per-token int8 grid, the
    first token of each text (axis -2, where first_token_apart) left exact; or, per_batch, to the u8 grid of
    the whole batch's range and zero (DynamicQuantizeLinear's)."""
    if per_batch:
        low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        step = max(high - low, 1e-12) / 255
        zero = np.clip(np.round(-low / step), 0, 255)
        return (np.clip(np.round(x / step) + zero, 0, 255) - zero) * step
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12) / 127
    rounded = np.clip(np.round(x / scale), -127, 127) * scale
    if first_token_apart:
        rounded[..., 0, :] = x[..., 0, :]
    return rounded


def smoothing_factors(input_max: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """The channel multipliers c of one input: max|w|^(1 - alpha) / max|x|^alpha, max|w| over the rows of every
    MatMul sharing the input, scaled so the largest is 1 (an overall factor cancels in both scales)."""
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    c = np.maximum(w_max, 1e-6) ** (1 - alpha) / np.maximum(input_max, 1e-6) ** alpha
    return (c / c.max()).astype(np.float32)


def rewrite_int8(src: Path, dst: Path, nodes: Sequence[str], first_token_fp32: Collection[str] = (),
                 smoothing: Mapping[str, np.ndarray] | None = None, per_batch: Collection[str] = ()) -> None:
    """Write src with these weight MatMuls in int8 to dst. first_token_fp32: the MatMul inputs, shaped [batch,
    tokens, hidden], whose first token stays fp32 (known from a run: the exported graphs' shapes are symbolic).
    smoothing: the channel multipliers (smoothing_factors) of the inputs to smooth. per_batch: the inputs
    quantized with one scale per batch instead (onnxruntime's DynamicQuantizeLinear: u8 from the batch's min
    and max, once per input whatever the MatMuls sharing it)."""
    smoothing = smoothing or {}
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
    dropped: set[str] = set()
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def int8_weights(node, c: np.ndarray | None, name: str) -> int:
        """The node's weights, divided by c where smoothed, as s8 initializers name+"w" and name+"w_scale";
        returns their column count."""
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        w8, w_scale = quantize_weights(w if c is None else w / c[:, None])
        added.extend([numpy_helper.from_array(w8, name + "w"), numpy_helper.from_array(w_scale, name + "w_scale")])
        return w.shape[1]

    def bias_add(y: str, columns: int):
        """The Add that alone reads y and adds a constant vector of its columns to it, if there is one."""
        if len(readers.get(y, [])) != 1 or readers[y][0].op_type != "Add":
            return None
        add = readers[y][0]
        other = add.input[1] if add.input[0] == y else add.input[0]
        return add if other in weights and list(weights[other].dims) == [columns] else None

    for index, (x, members) in enumerate(shared.items()):
        p = f"i8_{index}_"
        split = x in first_token_fp32
        c = smoothing.get(x)
        source, prelude = x, []
        if c is not None:
            added.append(numpy_helper.from_array(c, p + "smoothing"))
            prelude.append(helper.make_node("Mul", [x, p + "smoothing"], [p + "smoothed"]))
            source = p + "smoothed"
        if x in per_batch:
            prelude.append(helper.make_node("DynamicQuantizeLinear", [source], [p + "q", p + "step", p + "zero"]))
            for j, node in enumerate(members):
                name = f"{p}{j}_"
                columns = int8_weights(node, c, name)
                # A bias Add right after goes into the product (as onnxruntime's own fusion does for its
                # dynamic quantization): one pass over the output less.
                add = bias_add(node.output[0], columns)
                bias, out = "", node.output[0]
                if add:
                    bias, out = add.input[1] if add.input[0] == out else add.input[0], add.output[0]
                    dropped.add(add.name)
                replacement[node.name] = (prelude if j == 0 else []) + [helper.make_node(
                    "MatMulIntegerToFloat", [p + "q", name + "w", p + "step", name + "w_scale", p + "zero", "", bias],
                    [out], domain="com.microsoft")]
            continue
        # max |x| from the two reductions: no |x| tensor written and read back.
        prelude += [reduce("ReduceMax", source, p + "high"), reduce("ReduceMin", source, p + "low"),
                    helper.make_node("Neg", [p + "low"], [p + "minus_low"]),
                    helper.make_node("Max", [p + "high", p + "minus_low"], [p + "raw_max"]),
                    helper.make_node("Max", [p + "raw_max", "i8_tiny"], [p + "scale"]),  # an all-zero token
                    # x / max|x| on the grid of 1/127: the 127 lives in the constant scales, not in an op.
                    helper.make_node("Div", [source, p + "scale"], [p + "scaled"]),
                    helper.make_node("QuantizeLinear", [p + "scaled", "i8_step", "i8_zero_point"], [p + "q"])]
        q, scale = p + "q", p + "scale"
        if split:
            prelude += [helper.make_node("Slice", [p + "q", "i8_1", "i8_end", "i8_1"], [p + "q_rest"]),
                        helper.make_node("Slice", [p + "scale", "i8_1", "i8_end", "i8_1"], [p + "scale_rest"]),
                        helper.make_node("Slice", [x, "i8_0", "i8_1", "i8_1"], [p + "first"])]
            q, scale = p + "q_rest", p + "scale_rest"
        for j, node in enumerate(members):
            name = f"{p}{j}_"
            int8_weights(node, c, name)
            scaled = name + "rest" if split else node.output[0]
            replacement[node.name] = (prelude if j == 0 else []) + [
                helper.make_node("MatMulIntegerToFloat", [q, name + "w", "i8_step", name + "w_scale", "i8_zero_point"],
                                 [name + "y"], domain="com.microsoft"),
                helper.make_node("Mul", [name + "y", scale], [scaled])]
            if split:
                replacement[node.name] += [helper.make_node("MatMul", [p + "first", node.input[1]], [name + "first"]),
                                           helper.make_node("Concat", [name + "first", scaled], [node.output[0]], axis=1)]
    rewritten = [new for node in graph.node if node.name not in dropped for new in replacement.get(node.name, [node])]
    del graph.node[:]
    graph.node.extend(rewritten)
    read = {name for node in graph.node for name in node.input}
    kept = [t for t in [*graph.initializer, *added] if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
