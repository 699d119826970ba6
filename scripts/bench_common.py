"""What the inference micro-benchmarks share: docstring rows tokenized for the default model, and
batches planned the way the job plans them."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedder import ExportOptions, get_or_export, load_spec  # noqa: E402
from embedder.config import default_cache_dir  # noqa: E402
from embedder.infer.batching import pad_batch, plan_batches  # noqa: E402
from embedder.infer.tokenize import TextTokenizer  # noqa: E402


def default_model_rows(rows: int):
    """(cache entry of the default model, its tokens for `rows` docstring rows made by make_corpus.py)."""
    with tempfile.TemporaryDirectory(prefix="embedder-bench-") as tmp:
        corpus = Path(tmp) / "corpus.parquet"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(corpus),
                        "--rows", str(rows)], check=True, capture_output=True)
        texts = [t for t in pq.read_table(corpus, columns=["text"]).column("text").to_pylist() if t is not None]
    artifact = get_or_export(load_spec(None), ExportOptions(), default_cache_dir())
    return artifact, TextTokenizer(artifact.tokenizer_path, artifact.manifest.max_seq_length).encode(texts)


def padded_batches(artifact, tokens, max_tokens: int, max_batch_size: int = 256) -> list:
    """The padded batches the job would feed the graph at this token budget."""
    pad_id = artifact.manifest.pad_token_id
    return [pad_batch(tokens.ids, tokens.offsets, rows, pad_id)
            for rows in plan_batches(tokens.lengths, max_tokens, max_batch_size)]


def graph_feeds(batch, names) -> dict:
    """A padded batch as a graph's inputs: those of input_ids, attention_mask and (zero) token_type_ids it
    takes."""
    feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
             "token_type_ids": np.zeros_like(batch.input_ids)}
    return {k: v for k, v in feeds.items() if k in names}


def paired_rates(passes: dict, tokens: int, repeats: int) -> dict[str, list[float]]:
    """Tokens/s of each pass (a callable running every batch once) over `repeats` rounds.

    Rounds alternate the passes, reversing their order every other round, so a slow minute on a
    shared machine hits each alike and none always runs first.
    """
    rates: dict[str, list[float]] = {name: [] for name in passes}
    order = list(passes.items())
    for round_ in range(repeats):
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            run()
            rates[name].append(tokens / (time.perf_counter() - started))
    return rates


def run_all(encoder, batches: list) -> None:
    """One pass of an Encoder over the batches (the pass paired_rates times)."""
    for batch in batches:
        encoder(batch.input_ids, batch.attention_mask)


def kernel_share(session, by_provider: bool = False) -> tuple[float, dict[str, float]]:
    """(kernel seconds, share of kernel time per operator type, largest first) of a session run with profiling on;
    ends its profiling and removes the trace. by_provider keys the shares "op@provider" (a node on the CPU
    within a CUDA session shows as such)."""
    trace = session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    by_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            args = event["args"]
            by_op[f"{args['op_name']}@{args.get('provider', '?')}" if by_provider else args["op_name"]] += event["dur"]
    total = sum(by_op.values())
    return total / 1e6, {op: round(t / max(total, 1), 4) for op, t in by_op.most_common()}
