"""onnxruntime session settings on the CPU graph: memory pattern and arena on or off, paired.

    python scripts/bench_session.py --rows 3000

onnxruntime's memory pattern records the allocations of one input shape to replay them for the same
shape; length-sorted batches change shape nearly every batch. Each setting gets its own session on
the default model's CPU graph, and all run the same docstring rows at the CPU's default token budget,
alternating over --repeats rounds. Prints each setting's median tokens/s and the median per-round
ratio to onnxruntime's defaults (pattern and arena on).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import numpy as np

SETTINGS = {
    "defaults": {},
    "no memory pattern": {"enable_mem_pattern": False},
    "no arena": {"enable_cpu_mem_arena": False},
}


def main() -> int:
    from bench_common import (  # puts the repository on sys.path
        default_model_rows,
        graph_feeds,
        padded_batches,
        paired_rates,
    )

    from embedder.infer.devices import DEVICE_KINDS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=DEVICE_KINDS["cpu"].default_max_tokens, help="default: the job's CPU budget")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import onnxruntime as ort

    artifact, tokens = default_model_rows(args.rows)
    batches = padded_batches(artifact, tokens, args.max_tokens)
    sessions = {}
    for name, settings in SETTINGS.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        for key, value in settings.items():
            setattr(options, key, value)
        sessions[name] = ort.InferenceSession(str(artifact.graphs["cpu"]), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sessions["defaults"].get_inputs()}

    def feeds(batch):
        return graph_feeds(batch, inputs)

    real = int(tokens.lengths.sum())
    for session in sessions.values():  # first-run set-up is not the steady state
        session.run(None, feeds(batches[0]))

    def run_session(session) -> None:
        for batch in batches:
            session.run(None, feeds(batch))

    rates = paired_rates({name: functools.partial(run_session, s) for name, s in sessions.items()}, real, args.repeats)
    base = np.array(rates["defaults"])
    for name in sessions:
        print(json.dumps({
            "setting": name, "tokens_per_second": round(float(np.median(rates[name]))),
            "ratio_to_defaults": round(float(np.median(np.array(rates[name]) / base)), 3),
            "max_tokens": args.max_tokens, "rows": len(tokens.lengths), "threads": args.threads,
            "repeats": args.repeats,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
