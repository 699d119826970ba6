"""The vectors one graph of the default model gives for the int8 gate's texts, saved as .npz (one array per
domain): what scripts/bench_int8.py --avx2-gate runs under qemu-user, where the CPU model it emulates picks
onnxruntime's kernels.

    python scripts/gate_vectors.py GRAPH OUT.npz [--calibration] [--domain 'multilingual and emoji']
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    from bench_common import graph_feeds, padded_batches  # repository on sys.path

    from embedder import ExportOptions, get_or_export, load_spec
    from embedder.build.gate import domains
    from embedder.config import default_cache_dir
    from embedder.infer.devices import DEVICE_KINDS
    from embedder.infer.tokenize import TextTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("graph", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--calibration", action="store_true", help="the calibration texts instead of the gate's")
    p.add_argument("--domain", action="append", help="only this domain (repeatable; default: all three)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    import onnxruntime as ort

    artifact = get_or_export(load_spec(None), ExportOptions(), default_cache_dir())
    tokenizer = TextTokenizer(artifact.tokenizer_path, artifact.manifest.max_seq_length)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.graph), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    vectors = {}
    for domain in domains():
        if args.domain and domain.name not in args.domain:
            continue
        texts = domain.calibration if args.calibration else domain.gate
        out = []
        for batch in padded_batches(artifact, tokenizer.encode(list(texts)), DEVICE_KINDS["cpu"].default_max_tokens):
            out.append(session.run(None, graph_feeds(batch, names))[0])
        vectors[domain.name] = np.concatenate(out)
    np.savez(args.out, **vectors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
