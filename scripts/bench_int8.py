"""int8 quantization variants of the default model's CPU graph against fp32: speed, quality, time per operator.

    python scripts/bench_int8.py --rows 1000 --variants smooth,smooth-batch,smooth-7bit --profile
    python scripts/as_cpu.py avx2 -- python scripts/bench_int8.py --rows 1000 --variants smooth-7bit,smooth-7bit-nearest
    python scripts/as_cpu.py avx512-vnni -- python scripts/bench_int8.py --rows 1000 --variants smooth,smooth-batch
    python scripts/bench_int8.py --rows 1500 --variants s8,s8-reduce-range,s8-per-tensor,u8
    python scripts/bench_int8.py --rows 1000 --variants smooth-7bit --keep-fp32 attention/self/value
    python scripts/bench_int8.py --rows 100 --repeats 1 --variants smooth-7bit --avx2-gate \
        --avx2-domains 'multilingual and emoji'

Every weight MatMul quantized (but those whose names contain a --keep-fp32 part), one variant per choice the
int8 export weighs: onnxruntime's quantize_dynamic (weight type, per-channel scales, reduce_range: AVX2 without
VNNI multiplies u8 x s8 with vpmaddubsw, whose int16 pair sums can saturate; 7-bit weights avoid it), whose
activations share one scale per batch, and the export's rewrite (embedder.build.int8_graph), smoothed at
--alpha: `smooth-batch` (its recipe for VNNI: one scale per batch but at down-projections), `smooth-7bit` (its
recipe elsewhere: a scale per token, 7-bit weights rounded by GPTQ on the calibration texts),
`smooth-7bit-nearest` (the same rounded to nearest) and `smooth` (a scale per token, 8-bit weights, its VNNI
recipe before).
Variants measured once and dropped since are runnable at older commits: u8 x u8 products, s8 activations and
one batch scale with the first token apart at 6c3c27d; a scale per token with each text's first token through
the fp32 weights (the AVX2 recipe before, `per-token`), in part (`per-token-ln-ft`, `per-token-qkv-ft`) or not
at all (`per-token-first-int8`), and `smooth-ft`, at bee7c3b. All graphs run the same docstring batches at
the CPU's token budget in alternating rounds (bench_common.paired_rates); quality is min and mean cosine
against fp32 over those rows and the export gate's figures; --profile adds onnxruntime's share of kernel time
per operator type. Prints one JSON line with the CPU's ISA kind.

--avx2-gate adds each graph's gate on AVX2's int8 numerics, whatever this CPU: scripts/gate_vectors.py runs the
gate texts as on an AVX2-only CPU (scripts/as_cpu.py: cpuid masked at native speed where the CPU faults on
cpuid, else qemu-user's Haswell, about 700x slower). onnxruntime then takes its AVX2 kernels, whose vpmaddubsw
saturates its int16 pair sums, so the integer products are AVX2's bit for bit: the AVX2 recipe before
(`per-token` at bee7c3b) read 0.9953 on the multilingual mix so, both ways, and on a real Zen 3. To time the
variants on AVX2's kernels too, run the whole script that way:
python scripts/as_cpu.py avx2 -- python scripts/bench_int8.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = {
    "s8": {"weight_type": "QInt8", "per_channel": True},
    "s8-reduce-range": {"weight_type": "QInt8", "per_channel": True, "reduce_range": True},
    "s8-per-tensor": {"weight_type": "QInt8", "per_channel": False},
    "u8": {"weight_type": "QUInt8", "per_channel": True},
    # The export's rewrite (embedder.build.int8_graph): activation outlier channels moved into the weights
    # (SmoothQuant), every token int8. Its recipe for VNNI: one activation scale per batch except at
    # down-projections.
    "smooth-batch": None,
    # Its recipe elsewhere: a scale per token, 7-bit weights (AVX2's products cannot saturate) rounded by GPTQ
    # ... and rounded to nearest.
    "smooth-7bit": None,
    "smooth-7bit-nearest": None,
    # A scale per token, 8-bit weights.
    "smooth": None,
}


def main() -> int:
    import as_cpu  # scripts/ on sys.path
    from bench_common import (  # repository on sys.path
        default_model_rows,
        graph_feeds,
        kernel_share,
        padded_batches,
        paired_rates,
    )

    from embedder.build.gate import domains, row_cosines
    from embedder.build.int8_graph import SMOOTHED, SMOOTHED_7BIT, batch_scaled, rewrite_int8, smoothing_factors
    from embedder.build.isa import describe
    from embedder.infer.devices import DEVICE_KINDS
    from embedder.infer.tokenize import TextTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1500)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--profile", action="store_true")
    p.add_argument("--max-tokens", type=int, default=DEVICE_KINDS["cpu"].default_max_tokens,
                   help="token budget per batch (default: the job's for the CPU)")
    p.add_argument("--alpha", type=float, default=0.6, help="SmoothQuant's alpha for the smooth variants")
    p.add_argument("--keep-fp32", default="", help="comma list of name parts: MatMuls whose name holds one stay fp32")
    p.add_argument("--avx2-gate", action="store_true", help="also each graph's gate on AVX2's numerics (as_cpu.py)")
    p.add_argument("--avx2-domains", default="", help="comma list: only these gate domains under emulation")
    args = p.parse_args()
    if args.avx2_gate:
        as_cpu.command("avx2", [])  # exits now, not after the timings, where this machine cannot

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

    def matmul_weights(names: list[str]) -> dict[str, list]:
        """Each input of these MatMuls -> the weights of those reading it."""
        w = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        chosen = [n for n in graph.node if n.name in set(names)]
        return {x: [w[n.input[1]] for n in chosen if n.input[0] == x] for x in {n.input[0] for n in chosen}}

    def calibrated(names: list[str]) -> tuple[dict, dict]:
        """(smoothing factors at --alpha, Gram matrices) of these MatMuls' inputs on the export's calibration texts."""
        from embedder.build.quantize import input_statistics
        calibration = [t for d in domains() for t in d.calibration]
        tokenizer = TextTokenizer(artifact.tokenizer_path, artifact.manifest.max_seq_length)
        batches = padded_batches(artifact, tokenizer.encode(calibration), args.max_tokens)
        members = matmul_weights(names)
        feeds = [graph_feeds(b, {i.name for i in graph.input}) for b in batches]
        input_max, grams = input_statistics(fp32, list(members), feeds, grams=True)
        return {x: smoothing_factors(m, members[x], args.alpha) for x, m in input_max.items()}, grams

    with tempfile.TemporaryDirectory(prefix="embedder-int8-") as tmp:
        graphs = {"fp32": fp32}
        smoothing, grams = calibrated(nodes)
        for name in args.variants.split(","):
            if VARIANTS[name] is None:
                graphs[name] = Path(tmp) / f"{name}.onnx"
                per_batch = batch_scaled(matmul_weights(nodes)) if name == "smooth-batch" else set()
                bits = SMOOTHED_7BIT.weight_bits if name.startswith("smooth-7bit") else SMOOTHED.weight_bits
                rewrite_int8(fp32, graphs[name], nodes, smoothing, per_batch, bits,
                             grams if name == "smooth-7bit" else None)
                continue
            options = dict(VARIANTS[name])
            options["weight_type"] = getattr(QuantType, options["weight_type"])
            graphs[name] = Path(tmp) / f"{name}.onnx"
            quantize_dynamic(str(fp32), str(graphs[name]), nodes_to_quantize=nodes,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}, **options)
        sessions = {name: session(path) for name, path in graphs.items()}
        inputs = {i.name for i in sessions["fp32"].get_inputs()}
        vectors = {name: np.concatenate([s.run(None, graph_feeds(b, inputs))[0] for b in batches])
                   for name, s in sessions.items()}
        rates = paired_rates({name: (lambda s=s: [s.run(None, graph_feeds(b, inputs)) for b in batches])
                              for name, s in sessions.items()}, int(tokens.lengths.sum()), args.repeats)
        result = {"isa": describe(), "rows": len(tokens.lengths), "threads": args.threads, "quantized": len(nodes),
                  "kept_fp32": kept, "variants": {}}
        # The export's gate: min cosine on each domain's report texts (the hard one is the multilingual mix).
        tokenizer = TextTokenizer(artifact.tokenizer_path, artifact.manifest.max_seq_length)
        gate, fp32_gate = {}, {}
        for domain in domains():
            domain_batches = padded_batches(artifact, tokenizer.encode(list(domain.gate)),
                                            DEVICE_KINDS["cpu"].default_max_tokens)
            runs = {name: np.concatenate([s.run(None, graph_feeds(b, inputs))[0] for b in domain_batches])
                    for name, s in sessions.items()}
            gate[domain.name] = {name: round(float(row_cosines(v, runs["fp32"]).min()), 4) for name, v in runs.items()}
            fp32_gate[domain.name] = runs["fp32"]
        avx2_gate = {}
        for name, path in graphs.items() if args.avx2_gate else ():
            if name == "fp32":
                continue
            out = Path(tmp) / f"{name}.avx2.npz"
            only = [arg for d in args.avx2_domains.split(",") if d for arg in ("--domain", d)]
            argv, env, _ = as_cpu.command("avx2", [sys.executable, str(Path(__file__).with_name("gate_vectors.py")),
                                                   str(path), str(out), "--threads", str(args.threads), *only])
            subprocess.run(argv, env=env, check=True, stderr=subprocess.DEVNULL)
            emulated = np.load(out)
            avx2_gate[name] = {d: round(float(row_cosines(emulated[d], fp32_gate[d]).min()), 4) for d in emulated.files}
        for name, path in graphs.items():
            cosines = row_cosines(vectors[name], vectors["fp32"])
            result["variants"][name] = {
                "tokens_per_second": round(float(np.median(rates[name])), 1),
                "ratio_to_fp32": round(float(np.median(np.array(rates[name]) / np.array(rates["fp32"]))), 3),
                "min_cosine": round(float(cosines.min()), 5), "mean_cosine": round(float(cosines.mean()), 6),
                "gate_min_cosine": {domain: by_variant[name] for domain, by_variant in gate.items()}}
            if name in avx2_gate:
                result["variants"][name]["avx2_gate_min_cosine"] = avx2_gate[name]
            if args.profile:
                profiled = session(path, profile=True)
                for batch in batches:
                    profiled.run(None, graph_feeds(batch, inputs))
                result["variants"][name]["kernel_share"] = dict(list(kernel_share(profiled)[1].items())[:16])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
