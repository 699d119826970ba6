"""Inference rate by token budget (--max-tokens) on the CPU: where the default comes from.

    python scripts/bench_batching.py --rows 4000

Makes a docstring corpus, exports (or reuses) the default model's graph, tokenizes once, then runs
the same rows through onnxruntime at each budget, alternating budgets (in reversed order every
other round) over --repeats rounds so a slow minute on a shared machine hits every budget alike.
Prints the median tokens/s per budget, the padding efficiency, and the ratio to the 16384 budget.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--budgets", default="512,768,1024,1536,2048,4096,16384")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from bench_common import default_model_rows, padded_batches, paired_rates, run_all

    from embedder.infer.session import create_encoder

    artifact, tokens = default_model_rows(args.rows)
    encoder = create_encoder(artifact.graphs, "cpu", args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    plans = {b: padded_batches(artifact, tokens, b) for b in budgets}
    real = int(tokens.lengths.sum())
    rates = paired_rates({b: functools.partial(run_all, encoder, plans[b]) for b in budgets}, real, args.repeats)
    base = float(np.median(rates[16384])) if 16384 in rates else None
    for budget in budgets:
        median = float(np.median(rates[budget]))
        print(json.dumps({
            "max_tokens": budget, "tokens_per_second": round(median),
            "padding_efficiency": round(real / sum(b.padded_tokens for b in plans[budget]), 4),
            "ratio_to_16384": round(median / base, 3) if base else None,
            "rows": len(tokens.lengths), "threads": args.threads,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
