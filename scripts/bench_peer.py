"""Time sentence-transformers' own encode (or fastembed's embed) on a corpus: the peers the embedder is compared with.

Run by scripts/bench.py, possibly under another interpreter (the ONNX backend needs optimum-onnx,
which pins an older transformers, so it lives in its own virtualenv; see scripts/setup_peer_venv.sh).
Writes the vectors (.npy) and a JSON line with the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq


class FastEmbedPeer:
    """fastembed's TextEmbedding on the model's own ONNX export, loaded from disk (it cannot download here).

    fastembed reads a folder of a model it knows: the ONNX graph (sentence-transformers' export of the
    same model) plus the tokenizer files. Its tokenizer truncates at the smaller of tokenizer_config's
    model_max_length and max_length (128 for all-MiniLM-L6-v2), so both are set to the pipeline's
    max_seq_length (256), as the other engines truncate. fastembed batches rows in input order; it pools and normalizes itself.
    """

    def __init__(self, path: str, threads: int, name: str = "sentence-transformers/all-MiniLM-L6-v2"):
        import shutil
        from pathlib import Path

        from fastembed import TextEmbedding
        from sentence_transformers import SentenceTransformer

        work = Path(os.environ["BENCH_PEER_WORK"])
        st = SentenceTransformer(path, device="cpu", backend="onnx")
        st.save_pretrained(str(work))
        shutil.copy(work / "onnx" / "model.onnx", work / "model.onnx")
        config_file = work / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["model_max_length"] = config["max_length"] = st.max_seq_length  # fastembed takes the smaller
        config_file.write_text(json.dumps(config))
        self.tokenizer, self.max_seq_length = st.tokenizer, st.max_seq_length
        self.model = TextEmbedding(model_name=name, specific_model_path=str(work), threads=threads)

    def encode(self, texts, batch_size: int, **_):
        return np.array(list(self.model.embed(texts, batch_size=batch_size)), dtype=np.float32)


def load_model(path: str, backend: str, threads: int, device: str = "cpu"):
    if backend == "fastembed":
        return FastEmbedPeer(path, threads)
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    if backend == "torch":
        return SentenceTransformer(path, device=device)
    if backend == "torch-fp16":  # what a GPU user of sentence-transformers runs: the model in half precision
        return SentenceTransformer(path, device=device).half()
    if backend == "onnx":
        return SentenceTransformer(path, device="cpu", backend="onnx")
    # The optimized and quantized graphs are written beside a full copy of the model, as
    # sentence-transformers' documentation does it, then loaded by file name.
    import sentence_transformers as st

    work = os.environ["BENCH_PEER_WORK"]
    model = SentenceTransformer(path, device="cpu", backend="onnx")
    model.save_pretrained(work)
    if backend == "onnx-O3":
        st.export_optimized_onnx_model(model, "O3", work)
        file_name = "onnx/model_O3.onnx"
    else:
        st.export_dynamic_quantized_onnx_model(model, "avx2", work)
        file_name = "onnx/model_quint8_avx2.onnx"  # the name sentence-transformers gives it
    return SentenceTransformer(work, device="cpu", backend="onnx", model_kwargs={"file_name": file_name})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--backend", choices=("torch", "torch-fp16", "onnx", "onnx-O3", "onnx-int8", "fastembed"), default="torch")
    p.add_argument("--device", default="cpu", help="torch device for the torch backends (cpu, cuda)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch-size", type=int, help="default: each library's own (32 for sentence-transformers, 256 for fastembed)")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--vectors-out", required=True)
    args = p.parse_args()

    if args.batch_size is None:
        args.batch_size = 256 if args.backend == "fastembed" else 32
    if args.max_seq_len and args.backend == "fastembed":
        sys.exit("--max-seq-len applies to the sentence-transformers backends only")
    texts = [t for t in pq.read_table(args.corpus, columns=["text"]).column("text").to_pylist() if t is not None]
    started = time.perf_counter()
    model = load_model(args.model, args.backend, args.threads, args.device)
    if args.max_seq_len:
        model.max_seq_length = args.max_seq_len
    model.encode(texts[:64], batch_size=args.batch_size)  # warm-up, excluded from the steady state
    loaded = time.perf_counter()
    vectors = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
    done = time.perf_counter()  # encode returned numpy: the device work is finished
    tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"])
    np.save(args.vectors_out, vectors.astype(np.float32))
    print(json.dumps({
        "backend": args.backend, "device": args.device, "batch_size": args.batch_size, "rows": len(texts), "tokens": tokens,
        "startup_seconds": loaded - started, "encode_seconds": done - loaded,
        "tokens_per_second": tokens / (done - loaded), "rows_per_second": len(texts) / (done - loaded),
        "end_to_end_tokens_per_second": tokens / (done - started),
        "python": sys.executable,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
