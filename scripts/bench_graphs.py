"""Which graph each provider gets: the plain export against the offline-fused one.

    python scripts/bench_graphs.py --rows 3000
    python scripts/bench_graphs.py --device cuda --budgets 16384,65536     # on a GPU host

A fp32 cache entry holds two graphs: model.onnx (the plain export, left to onnxruntime's session
optimizer) and model.cuda.onnx (Attention, EmbedLayerNorm, SkipLayerNorm and BiasGelu fused
offline). Both run on --device (default cpu) over the same docstring rows at each token budget,
alternating graphs over --repeats rounds so a slow minute hits both alike. Prints each graph's
median tokens/s and the median of the per-round ratio fused/plain.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--budgets", default="1024,16384")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where both graphs run")
    args = p.parse_args()

    from bench_common import default_model_rows, padded_batches, paired_rates, run_all

    from embedder.infer.session import create_encoder

    artifact, tokens = default_model_rows(args.rows)
    graphs = {"plain": artifact.graphs["cpu"], "fused": artifact.graphs["cuda"]}
    if graphs["plain"] == graphs["fused"]:
        sys.exit("this cache entry has one graph only (the fusion did not validate): nothing to compare")
    encoders = {name: create_encoder(path, args.device, args.threads) for name, path in graphs.items()}
    real = int(tokens.lengths.sum())
    for budget in (int(b) for b in args.budgets.split(",")):
        batches = padded_batches(artifact, tokens, budget)
        for name, encoder in encoders.items():  # warm-up: first-run allocations are not the steady state
            encoder(batches[0].input_ids, batches[0].attention_mask)
        rates = paired_rates({name: functools.partial(run_all, encoder, batches) for name, encoder in encoders.items()},
                             real, args.repeats)
        ratio = np.array(rates["fused"]) / np.array(rates["plain"])
        print(json.dumps({
            "max_tokens": budget,
            "plain_tokens_per_second": round(float(np.median(rates["plain"]))),
            "fused_tokens_per_second": round(float(np.median(rates["fused"]))),
            "fused_over_plain": round(float(np.median(ratio)), 3),
            "rows": len(tokens.lengths), "threads": args.threads, "repeats": args.repeats,
            "device": encoders["plain"].device,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
