"""Where inference time goes: onnxruntime's per-operator profile of the default model's CPU graph.

    python scripts/profile_graph.py --rows 3000

Runs the docstring rows once through the graph (plain CPU graph by default, --graph cuda for the
fused one, still on the CPU provider) at the CPU's token budget with onnxruntime's profiler on,
then prints the share of kernel time per operator type.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def main() -> int:
    from bench_common import (  # puts the repository on sys.path
        default_model_rows,
        graph_feeds,
        kernel_share,
        padded_batches,
    )

    from embedder.infer.devices import DEVICE_KINDS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=DEVICE_KINDS["cpu"].default_max_tokens, help="default: the job's CPU budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--graph", choices=("cpu", "cuda"), default="cpu", help="which graph of the cache entry")
    args = p.parse_args()

    import onnxruntime as ort

    artifact, tokens = default_model_rows(args.rows)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_mem_pattern = False  # as the job's sessions run
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "embedder-profile")
    session = ort.InferenceSession(str(artifact.graphs[args.graph]), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    for batch in padded_batches(artifact, tokens, args.max_tokens):
        session.run(None, graph_feeds(batch, names))
    seconds, share = kernel_share(session)
    print(json.dumps({"graph": artifact.graphs[args.graph].name, "rows": len(tokens.lengths),
                      "max_tokens": args.max_tokens, "threads": args.threads,
                      "kernel_seconds": round(seconds, 2), "share": share}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
