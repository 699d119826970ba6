"""int8 quantization variants of the default model's CPU graph against fp32: speed, quality, time per operator.

    python scripts/bench_int8.py --rows 1500 --variants s8,s8-reduce-range,s8-per-tensor,u8 --profile
    python scripts/bench_int8.py --rows 1000 --variants s8,per-token --keep-fp32 attention/self/value,attention/self/key

Every weight MatMul quantized (but those whose names contain a --keep-fp32 part), one variant per choice the
int8 export weighs: onnxruntime's quantize_dynamic (weight type, per-channel scales, reduce_range: AVX2 without
VNNI multiplies u8 x s8 with vpmaddubsw, whose int16 pair sums can saturate; 7-bit weights avoid it), whose
activations share one scale per batch, and `per-token`, a graph rewrite giving each token's activations a scale
of their own (per_token_int8 below). All graphs run the same docstring batches at the
CPU's token budget in alternating rounds (bench_common.paired_rates); quality is min and mean cosine against
fp32 over those rows; --profile adds onnxruntime's share of kernel time per operator type. Prints one JSON line
with the CPU's ISA kind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = {
    "s8": {"weight_type": "QInt8", "per_channel": True},
    "s8-reduce-range": {"weight_type": "QInt8", "per_channel": True, "reduce_range": True},
    "s8-per-tensor": {"weight_type": "QInt8", "per_channel": False},
    "u8": {"weight_type": "QUInt8", "per_channel": True},
    # per_token_int8: u8 activations about 128 (on AVX2 without VNNI, vpmaddubsw's int16 pair sums of u8 x s8 can
    # saturate), or s8 activations (no offset, no saturation; onnxruntime's CPU kernel for s8 x s8 ran at 0.32x
    # fp32 on AVX2 Zen 3: measure it where VNNI is).
    "per-token": None,
    "per-token-s8": None,
    # u8 x u8 (weights u8 about 128 too): MLAS multiplies these in int16 (vpmaddwd), so nothing saturates on AVX2.
    "per-token-u8u8": None,
    # -ft: the first token's products in fp32 (below).
    "per-token-ft": None,
    "per-token-u8u8-ft": None,
    # one scale per batch (DynamicQuantizeLinear) over tokens 1.., the first token's products in fp32
    "batch-ft": None,
}


def per_token_int8(src: Path, dst: Path, nodes: list[str], signed: bool = False, u8_weights: bool = False,
                   first_token_fp32: bool = False, per_batch: bool = False) -> None:
    """src with these MatMuls in int8, each token's activations scaled on their own.

    For each input the MatMuls share: s = max|x| / 127 per row, q = QuantizeLinear(x / s, 1, 128) (u8, symmetric
    about 128; signed: s8 about 0); per MatMul MatMulIntegerToFloat(q, W8, 1, w_scale) * s, W8 the s8 weights with one scale per
    output column (u8_weights: the same values + 128, zero point 128). onnxruntime's dynamic quantization instead gives the batch one scale, so one token's outlier
    channel coarsens every other token's rounding.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    weights = {t.name: t for t in graph.initializer}
    groups: dict[str, list] = {}
    chosen = set(nodes)
    for node in graph.node:
        if node.name in chosen:
            groups.setdefault(node.input[0], []).append(node)
    added = [numpy_helper.from_array(np.array(v, dtype), name) for name, v, dtype in
             (("pt_one", 1.0, np.float32), ("pt_127", 127.0, np.float32), ("pt_tiny", 1e-12, np.float32),
              ("pt_zero_point", 0 if signed else 128, np.int8 if signed else np.uint8),
              ("pt_w_zero_point", 128 if u8_weights else 0, np.uint8 if u8_weights else np.int8),
              ("pt_last_axis", [-1], np.int64), ("pt_0", [0], np.int64), ("pt_1", [1], np.int64),
              ("pt_end", [2**62], np.int64))]
    replacement: dict[str, list] = {}
    for index, (x, members) in enumerate(groups.items()):
        p = f"pt{index}_"
        if per_batch:
            rest = p + "x_rest" if first_token_fp32 else x
            prelude = [helper.make_node("Slice", [x, "pt_1", "pt_end", "pt_1"], [rest])] if first_token_fp32 else []
            prelude += [helper.make_node("Slice", [x, "pt_0", "pt_1", "pt_1"], [p + "x0"])] if first_token_fp32 else []
            prelude.append(helper.make_node("DynamicQuantizeLinear", [rest], [p + "q", p + "a_scale", p + "a_zero"]))
            q, scale, a_scale, a_zero = p + "q", None, p + "a_scale", p + "a_zero"
        else:
            row_max = (helper.make_node("ReduceMax", [p + "abs"], [p + "max"], axes=[-1], keepdims=1) if opset < 18 else
                       helper.make_node("ReduceMax", [p + "abs", "pt_last_axis"], [p + "max"], keepdims=1))
            prelude = [helper.make_node("Abs", [x], [p + "abs"]), row_max,
                       helper.make_node("Div", [p + "max", "pt_127"], [p + "raw_scale"]),
                       helper.make_node("Max", [p + "raw_scale", "pt_tiny"], [p + "scale"]),
                       helper.make_node("Div", [x, p + "scale"], [p + "scaled"]),
                       helper.make_node("QuantizeLinear", [p + "scaled", "pt_one", "pt_zero_point"], [p + "q"])]
            q, scale, a_scale, a_zero = p + "q", p + "scale", "pt_one", "pt_zero_point"
            if first_token_fp32:  # int8 for tokens 1.., the first token's row through the fp32 weights
                prelude += [helper.make_node("Slice", [p + "q", "pt_1", "pt_end", "pt_1"], [p + "q_rest"]),
                            helper.make_node("Slice", [p + "scale", "pt_1", "pt_end", "pt_1"], [p + "scale_rest"]),
                            helper.make_node("Slice", [x, "pt_0", "pt_1", "pt_1"], [p + "x0"])]
                q, scale = p + "q_rest", p + "scale_rest"
        for j, node in enumerate(members):
            w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
            w_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / 127).astype(np.float32)
            name = f"{p}{j}_"
            w8 = np.clip(np.round(w / w_scale), -127, 127)
            w8 = (w8 + 128).astype(np.uint8) if u8_weights else w8.astype(np.int8)
            added += [numpy_helper.from_array(w8, name + "w"),
                      numpy_helper.from_array(w_scale, name + "w_scale")]
            out = name + "rest" if first_token_fp32 else node.output[0]
            replacement[node.name] = (prelude if j == 0 else []) + [
                helper.make_node("MatMulIntegerToFloat", [q, name + "w", a_scale, name + "w_scale",
                                                         a_zero, "pt_w_zero_point"], [name + "y" if scale else out],
                                 domain="com.microsoft")]
            if scale:
                replacement[node.name].append(helper.make_node("Mul", [name + "y", scale], [out]))
            if first_token_fp32:
                replacement[node.name] += [helper.make_node("MatMul", [p + "x0", node.input[1]], [name + "y0"]),
                                           helper.make_node("Concat", [name + "y0", out], [node.output[0]], axis=1)]
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


def main() -> int:
    from bench_common import default_model_rows, kernel_share, padded_batches, paired_rates  # repository on sys.path

    from embedder.build.gate import domains, row_cosines
    from embedder.infer.tokenize import TextTokenizer
    from embedder.build.isa import describe
    from embedder.infer.devices import DEVICE_KINDS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1500)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--profile", action="store_true")
    p.add_argument("--max-tokens", type=int, default=DEVICE_KINDS["cpu"].default_max_tokens,
                   help="token budget per batch (default: the job's for the CPU)")
    p.add_argument("--keep-fp32", default="", help="comma list of name parts: MatMuls whose name holds one stay fp32")
    args = p.parse_args()

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    artifact, tokens = default_model_rows(args.rows)
    batches = padded_batches(artifact, tokens, args.max_tokens)
    fp32 = artifact.graphs["cpu"]
    graph = onnx.load(str(fp32)).graph
    weights = {t.name for t in graph.initializer}
    kept = [part for part in args.keep_fp32.split(",") if part]
    nodes = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights
             and not any(part in n.name for part in kept)]

    def session(path: Path, profile: bool = False):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.enable_mem_pattern = False  # as the job's sessions run
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "embedder-int8-profile")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def feeds(batch, names):
        all_ = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "token_type_ids": np.zeros_like(batch.input_ids)}
        return {k: v for k, v in all_.items() if k in names}

    with tempfile.TemporaryDirectory(prefix="embedder-int8-") as tmp:
        graphs = {"fp32": fp32}
        for name in args.variants.split(","):
            if VARIANTS[name] is None:
                graphs[name] = Path(tmp) / f"{name}.onnx"
                per_token_int8(fp32, graphs[name], nodes, signed=name.endswith("-s8"), u8_weights="u8u8" in name,
                               first_token_fp32=name.endswith("-ft"), per_batch=name.startswith("batch"))
                continue
            options = dict(VARIANTS[name])
            options["weight_type"] = getattr(QuantType, options["weight_type"])
            graphs[name] = Path(tmp) / f"{name}.onnx"
            quantize_dynamic(str(fp32), str(graphs[name]), nodes_to_quantize=nodes,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}, **options)
        sessions = {name: session(path) for name, path in graphs.items()}
        inputs = {i.name for i in sessions["fp32"].get_inputs()}
        vectors = {name: np.concatenate([s.run(None, feeds(b, inputs))[0] for b in batches])
                   for name, s in sessions.items()}
        rates = paired_rates({name: (lambda s=s: [s.run(None, feeds(b, inputs)) for b in batches])
                              for name, s in sessions.items()}, int(tokens.lengths.sum()), args.repeats)
        result = {"isa": describe(), "rows": len(tokens.lengths), "threads": args.threads, "quantized": len(nodes),
                  "kept_fp32": kept, "variants": {}}
        # The export's gate: min cosine on each domain's report texts (the hard one is the multilingual mix).
        tokenizer = TextTokenizer(artifact.tokenizer_path, artifact.manifest.max_seq_length)
        gate = {}
        for domain in domains():
            domain_batches = padded_batches(artifact, tokenizer.encode(list(domain.gate)),
                                            DEVICE_KINDS["cpu"].default_max_tokens)
            runs = {name: np.concatenate([s.run(None, feeds(b, inputs))[0] for b in domain_batches])
                    for name, s in sessions.items()}
            gate[domain.name] = {name: round(float(row_cosines(v, runs["fp32"]).min()), 4) for name, v in runs.items()}
        for name, path in graphs.items():
            cosines = row_cosines(vectors[name], vectors["fp32"])
            result["variants"][name] = {
                "tokens_per_second": round(float(np.median(rates[name])), 1),
                "ratio_to_fp32": round(float(np.median(np.array(rates[name]) / np.array(rates["fp32"]))), 3),
                "min_cosine": round(float(cosines.min()), 5), "mean_cosine": round(float(cosines.mean()), 6),
                "gate_min_cosine": {domain: by_variant[name] for domain, by_variant in gate.items()}}
            if args.profile:
                profiled = session(path, profile=True)
                for batch in batches:
                    profiled.run(None, feeds(batch, inputs))
                result["variants"][name]["kernel_share"] = dict(list(kernel_share(profiled)[1].items())[:8])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
