"""What folding attention's key Transposes (embedder/cpu_graph.py) buys on the CPU provider.

    python scripts/bench_cpu_graph.py --rows 2000

Takes the default model's CPU graph from the cache (exported if missing), writes an "as exported"
copy with each FusedMatMul(transB) and its Transpose turned back into MatMul after a Transpose that
moves the innermost axis, checks that both give bit-identical vectors, then times them on the same
docstring rows at the CPU's token budget, alternating over --repeats rounds so a slow minute hits
both alike. Prints each graph's median tokens/s and the median of the per-round ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def unfold(src: Path, dst: Path) -> int:
    """The inverse of cpu_graph.fold_key_transposes: what the exporter wrote."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    producer = {out: node for node in model.graph.node for out in node.output}
    unfolded = 0
    for index, node in enumerate(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "FusedMatMul" or attrs.get("transB") != 1 or attrs.get("alpha", 1.0) != 1.0:
            continue
        transpose = producer[node.input[1]]
        perm = list(helper.get_attribute_value(transpose.attribute[0]))
        transpose.attribute[0].CopyFrom(helper.make_attribute("perm", perm[:-2] + [perm[-1], perm[-2]]))
        model.graph.node[index].CopyFrom(helper.make_node("MatMul", list(node.input), list(node.output), name=node.name))
        unfolded += 1
    onnx.save(model, str(dst))
    return unfolded


def main() -> int:
    from bench_common import default_model_rows, padded_batches, paired_rates, run_all  # repository on sys.path

    from embedder.infer.devices import DEVICE_KINDS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=DEVICE_KINDS["cpu"].default_max_tokens, help="default: the job's CPU budget")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()


    from embedder.infer.session import create_encoder

    artifact, tokens = default_model_rows(args.rows)
    with tempfile.TemporaryDirectory(prefix="embedder-bench-") as tmp:
        exported = Path(tmp) / "as-exported.onnx"
        if not unfold(artifact.graphs["cpu"], exported):
            sys.exit("the cached CPU graph has no folded key Transpose: nothing to compare")
        encoders = {"as_exported": create_encoder(exported, "cpu", args.threads),
                    "folded": create_encoder(artifact.graphs["cpu"], "cpu", args.threads)}
        batches = padded_batches(artifact, tokens, args.max_tokens)
        vectors = {name: np.concatenate([e(b.input_ids, b.attention_mask) for b in batches]) for name, e in encoders.items()}
        identical = bool(np.array_equal(vectors["as_exported"], vectors["folded"]))
        real = int(tokens.lengths.sum())
        rates = paired_rates({name: functools.partial(run_all, e, batches) for name, e in encoders.items()},
                             real, args.repeats)
    ratio = np.array(rates["folded"]) / np.array(rates["as_exported"])
    print(json.dumps({
        "max_tokens": args.max_tokens, "rows": len(tokens.lengths), "threads": args.threads, "repeats": args.repeats,
        "vectors_bit_identical": identical,
        "as_exported_tokens_per_second": round(float(np.median(rates["as_exported"]))),
        "folded_tokens_per_second": round(float(np.median(rates["folded"]))),
        "folded_over_as_exported": round(float(np.median(ratio)), 3),
        "per_round": [round(float(r), 3) for r in ratio],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
