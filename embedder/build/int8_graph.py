"""The int8 rewrite of a graph's weight MatMuls, with one of two recipes, chosen by the kind of CPU that
exports (recipe_for).

onnxruntime's dynamic quantization gives a whole batch one activation scale, so one token's outliers coarsen
every other token's rounding. A scale per token avoids that (max |x| / 127, u8 about 128): the products are
onnxruntime's fused u8 x s8 MatMulIntegerToFloat with one weight scale per output column, then one multiply
by the token's scale.

What rounds badly: in BERT-family encoders the first token ([CLS], <s>) is an attention sink that carries one
massive channel (all-MiniLM-L6-v2: channel 99, max / rms about 19 in every layer's LayerNorm outputs; after
GELU, one channel at 14-25 where the other tokens have about 0). Its own scale then rounds its other channels to
zero, and attention carries the error to every token: a scale per token alone reads min cosine 0.983 on the
gate's multilingual mix. Both recipes use SmoothQuant (Xiao et al., 2022): each input channel scaled by c, the
weights' rows by 1/c, which moves part of an outlier channel's range into the weights; every token int8.
Figures: scripts/bench_int8.py --rows 1000, all 36 MatMuls int8, gate figures docstrings / short sentences /
multilingual mix; "VNNI with AMX" is 2 cores of a Xeon (Sapphire Rapids), "VNNI without AMX" and "AVX2" that
Xeon masked by scripts/as_cpu.py (AVX2's int8 numerics exactly, its speed a little above a real Zen 3's):
- SMOOTHED (VNNI): one activation scale per batch is enough (onnxruntime's DynamicQuantizeLinear, whose scale
  is computed once per shared input and whose bias Add goes into the product), except at down-projections
  (batch_scaled). At alpha 0.6, 2.11x fp32 on VNNI with AMX, 1.80x on VNNI without it, gate 0.998 / 0.9965 /
  0.9936.
- SMOOTHED_7BIT (AVX2, AVX-512 without VNNI, other CPUs): a scale per token everywhere and 7-bit weights rounded
  by GPTQ (embedder.build.gptq). AVX2 multiplies u8 x s8 with vpmaddubsw, whose int16 pair sums saturate
  where smoothing fills both ranges (8-bit weights: gate 0.9845 / 0.9845 / 0.9815 on AVX2, 0.976 on the mix
  on a real Zen 3); 255 * 63 * 2 < 32767 cannot. At alpha 0.6 on AVX2: gate 0.9974 / 0.9965 / 0.9916 with
  GPTQ, 0.9948 / 0.9938 / 0.9876 rounded to nearest; 1.33x fp32 (bench_int8; the products are 62% of int8
  kernel time). The job's export on AVX2 chose alpha 0.7: gate 0.9962 / 0.9969 / 0.9939, and in
  scripts/bench.py it ran 1.51x fp32 (5 paired runs) where the recipe before ran 1.47x in the same runs (a
  scale per token, 8-bit weights, not smoothed, each text's first token through the fp32 weights: its
  Slice, fp32 product and Concat were 8% of int8 kernel time, its fp32 weights 42 MB of a 101 MB graph).
  On AVX2, one scale per batch fails the gate's mix even with 7-bit GPTQ weights (scratch runs, figures in
  issue 16's notes), as do 7-bit activations (u8 1..127, which cannot saturate; mix 0.982-0.986); u8
  weights (u8 x u8 products, which MLAS widens to int16 on AVX2, exact) ran 1.13x.

Per input x that chosen MatMuls share:
    xs = x * c; m = max(max(xs), -min(xs)) per token; q = QuantizeLinear(xs / m, 1/127, 128)
    per MatMul: MatMulIntegerToFloat(q, W8, 1/127, w_scale, 128) * m, W8 from W / c
    per batch: q, step, zero = DynamicQuantizeLinear(xs); per MatMul MatMulIntegerToFloat(q, W8, step,
    w_scale, zero, bias) in place of the MatMul and its bias Add
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.build.gptq import gptq_round

# In int8 cache keys. 5: smoothed with 7-bit GPTQ weights off VNNI; 4: smoothed with batch scales; 3: the
# recipes; 2: per token, first token fp32; 1: quantize_dynamic
INT8_FORMAT = 5


@dataclass(frozen=True)
class Recipe:
    """How the rewrite quantizes (the module's figures)."""

    name: str
    method: str  # for the manifest
    per_batch: bool  # one activation scale per batch where batch_scaled says so, else one per token
    weight_bits: int  # 8, or 7 where the int8 products would saturate
    gptq: bool  # weights rounded against the calibration inputs (embedder.build.gptq), else to nearest


SMOOTHED = Recipe("smoothed-batch",
                  "int8 smoothed: activation channels scaled into the weights (SmoothQuant), u8 activations with "
                  "one scale per batch (onnxruntime DynamicQuantizeLinear) except at down-projections (one scale per "
                  "token), s8 weights with one scale per output column (MatMulIntegerToFloat), every token int8",
                  per_batch=True, weight_bits=8, gptq=False)
SMOOTHED_7BIT = Recipe("smoothed-7bit-gptq",
                       "int8 smoothed: activation channels scaled into the weights (SmoothQuant), u8 activations "
                       "with one scale per token, 7-bit weights (-63..63, so AVX2's int16 pair sums cannot saturate) "
                       "with one scale per output column, rounded by GPTQ on the calibration texts "
                       "(MatMulIntegerToFloat), every token int8",
                       per_batch=False, weight_bits=7, gptq=True)
# Tried in turn at export, the best on calibration kept: 0.5 is SmoothQuant's default. all-MiniLM-L6-v2's
# calibration min cosine with SMOOTHED at 0.6 / 0.7 / 0.8: 0.9959 / 0.9943 / 0.978 (0.5: gate mix 0.991
# against 0.993 at 0.6).
SMOOTHING_ALPHAS = (0.5, 0.6, 0.7)


def recipe_for(isa_kind: str) -> Recipe:
    """SMOOTHED where u8 x s8 products accumulate in int32 in one instruction (VNNI), else SMOOTHED_7BIT."""
    return SMOOTHED if isa_kind in ("avx512-vnni", "avx-vnni") else SMOOTHED_7BIT


def batch_scaled(inputs: Mapping[str, Sequence[np.ndarray]]) -> set[str]:
    """The inputs (name -> weights of the MatMuls reading it) to quantize with one scale per batch: all but those
    of down-projections (more rows than columns, the FFN's output projection), which read an activation's
    output (GELU), heavy-tailed per token: with one batch scale there too, all-MiniLM-L6-v2's gate mix read
    0.990, against 0.997 with those products left in fp32."""
    return {x for x, ws in inputs.items() if all(w.shape[0] <= w.shape[1] for w in ws)}


def quantize_weights(w: np.ndarray, bits: int = 8, gram: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values in +-(2^(bits-1) - 1), one fp32 scale per output column) of a [in, out] weight matrix,
    symmetric: rounded to nearest, or by GPTQ against gram (X^T X of the inputs it multiplies)."""
    levels = 2 ** (bits - 1) - 1
    step = np.maximum(np.abs(w).max(axis=0), 1e-12).astype(np.float64) / levels
    scale = step.astype(np.float32)
    if gram is not None:
        return gptq_round(w, step, gram, levels), scale
    return np.clip(np.round(w / scale), -levels, levels).astype(np.int8), scale


def smoothed_weights(w: np.ndarray, c: np.ndarray | None, bits: int = 8,
                     gram: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """quantize_weights of W / c (W where c is None), whose inputs are x c: GPTQ rounds it against c X^T X c,
    given gram, X^T X of the unsmoothed inputs."""
    if c is None:
        return quantize_weights(w, bits, gram)
    return quantize_weights(w / c[:, None], bits, None if gram is None else gram * np.outer(c, c))


def round_trip(x: np.ndarray, per_batch: bool = False) -> np.ndarray:
    """x ([..., hidden]) as the rewritten graph's activations see it: rounded to its per-token int8 grid or,
    per_batch, to the u8 grid of the whole batch's range and zero (DynamicQuantizeLinear's)."""
    if per_batch:
        low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        step = max(high - low, 1e-12) / 255
        zero = np.clip(np.round(-low / step), 0, 255)
        return (np.clip(np.round(x / step) + zero, 0, 255) - zero) * step
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-12) / 127
    return np.clip(np.round(x / scale), -127, 127) * scale


def smoothing_factors(input_max: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """The channel multipliers c of one input: max|w|^(1 - alpha) / max|x|^alpha, max|w| over the rows of every
    MatMul sharing the input, scaled so the largest is 1 (an overall factor cancels in both scales)."""
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    c = np.maximum(w_max, 1e-6) ** (1 - alpha) / np.maximum(input_max, 1e-6) ** alpha
    return (c / c.max()).astype(np.float32)


def rewrite_int8(src: Path, dst: Path, nodes: Sequence[str], smoothing: Mapping[str, np.ndarray] | None = None,
                 per_batch: Collection[str] = (), weight_bits: int = 8,
                 grams: Mapping[str, np.ndarray] | None = None) -> None:
    """Write src with these weight MatMuls in int8 to dst. smoothing: the channel multipliers
    (smoothing_factors) of the inputs to smooth. per_batch: the inputs quantized with one scale per batch
    instead of per token (onnxruntime's DynamicQuantizeLinear: u8 from the batch's min and max, once per input
    whatever the MatMuls sharing it). weight_bits: 8, or 7 where products must not saturate. grams: X^T X of
    the inputs (before smoothing) whose MatMuls' weights GPTQ rounds; the others are rounded to nearest."""
    smoothing, grams = smoothing or {}, grams or {}
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
        ("i8_zero_point", 128, np.uint8), ("i8_last_axis", [-1], np.int64))]

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
        w8, w_scale = smoothed_weights(w, c, weight_bits, grams.get(node.input[0]))
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
        for j, node in enumerate(members):
            name = f"{p}{j}_"
            int8_weights(node, c, name)
            replacement[node.name] = (prelude if j == 0 else []) + [
                helper.make_node("MatMulIntegerToFloat", [p + "q", name + "w", "i8_step", name + "w_scale",
                                                          "i8_zero_point"], [name + "y"], domain="com.microsoft"),
                helper.make_node("Mul", [name + "y", p + "scale"], [node.output[0]])]
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
