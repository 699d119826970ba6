"""GPU benchmark: jobs.embed fp32 and fp16 on CUDA against sentence-transformers fp16 on the same GPU.

    python scripts/bench_gpu.py --rows 20000                     # the BERT-base-shaped model
    python scripts/bench_gpu.py --rows 20000 --model default     # all-MiniLM-L6-v2, the shipped default
    python scripts/bench_gpu.py --device cpu --layers 2 --rows 300 --budgets 2048   # checks the script, no GPU

Throughput does not depend on the weights, so the script needs no download: by default it builds a
BERT-base-shaped sentence-transformers model (hidden 768, 12 heads, --layers layers, mean pooling,
normalize) from its config with seeded random weights and all-MiniLM-L6-v2's WordPiece tokenizer (the
same 30,522-token BERT vocabulary). --model takes a model folder instead, or `default`. On the same docstring rows it runs jobs.embed (Parquet in and out, warm
graph cache) in fp32 and fp16 at each --max-tokens budget, and sentence-transformers' encode with the
model in fp16 at each --st-batch-sizes. Prints one JSON object and writes it to bench/gpu_results.json.

Needs onnxruntime-gpu with its CUDA provider working (`pip install -e '.[gpu]'`), a CUDA build of
torch and sentence-transformers for the peer. fp16 graphs run on CUDA only, so --device cpu skips them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def build_model(folder: Path, layers: int) -> Path:
    """A BERT-base-shaped sentence-transformers model with seeded random weights."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    from embedder.model.spec import default_model_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    hf = folder / "hf"
    BertModel(config).eval().save_pretrained(hf)
    source = default_model_path()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, hf / name)
    transformer = models.Transformer(str(hf), max_seq_length=256)
    st = SentenceTransformer(modules=[transformer, models.Pooling(768, "mean"), models.Normalize()], device="cpu")
    out = folder / "bert-base-random"
    st.save(str(out))
    return out


def model_folder(model: str, work: Path, layers: int) -> Path:
    if model == "bert-base":
        return build_model(work, layers)
    if model == "default":
        from embedder.model.spec import default_model_path

        return default_model_path()
    return Path(model)


def headline(results: list[dict], best_peer: dict) -> dict:
    """Each precision's best budget (steady tokens/s) against the best sentence-transformers batch size."""
    figures = {}
    for precision in ("fp32", "fp16"):
        runs = [r for r in results if r["engine"] == f"embedder {precision}"]
        if runs:
            best = max(runs, key=lambda r: r["tokens_per_second"])
            figures[f"{precision}_best_max_tokens"] = best["max_tokens"]
            figures[f"{precision}_vs_st_{best_peer['backend'].removeprefix('torch').strip('-') or 'fp32'}"] = (
                best["tokens_per_second"] / best_peer["tokens_per_second"])
            figures[f"{precision}_min_cosine_to_fp32"] = min(r["min_cosine_to_embedder_fp32"] for r in runs)
            figures[f"{precision}_min_cosine_to_st"] = min(r["min_cosine_to_st"] for r in runs)
    return figures


def run_job(corpus: Path, model: Path, cache: Path, device: str, precision: str, budget: int,
            work: Path) -> tuple[dict, np.ndarray]:
    out, metrics_file = work / f"{precision}-{budget}.parquet", work / f"{precision}-{budget}.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.embed", "--in", str(corpus), "--out", str(out), "--overwrite",
                    "--model", str(model), "--cache-dir", str(cache), "--device", device, "--precision", precision,
                    "--max-tokens", str(budget), "--metrics-out", str(metrics_file), "--progress", "off"],
                   cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - started
    metrics = json.loads(metrics_file.read_text())
    steady = sum(metrics["stage_seconds"][s] for s in ("read", "tokenize", "infer", "write"))
    column = pq.read_table(out, columns=["embedding"]).column("embedding").combine_chunks()
    vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
    return {
        "engine": f"embedder {precision}", "max_tokens": budget, "device": metrics["device"],
        "tokens_per_second": metrics["real_tokens"] / steady,
        "infer_tokens_per_second": metrics["real_tokens"] / metrics["stage_seconds"]["infer"],
        "end_to_end_tokens_per_second": metrics["real_tokens"] / wall,
        "padding_efficiency": metrics["padding_efficiency"], "peak_rss_mb": metrics["peak_rss_mb"],
    }, vectors


def run_peer(corpus: Path, model: Path, device: str, backend: str, batch_size: int, work: Path):
    vectors_file = work / f"st-{backend}-{batch_size}.npy"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_peer.py"), "--model", str(model),
                           "--corpus", str(corpus), "--backend", backend, "--device", device,
                           "--batch-size", str(batch_size), "--vectors-out", str(vectors_file)],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["engine"] = f"sentence-transformers {backend}"
    return result, np.load(vectors_file)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--model", default="bert-base",
                   help="bert-base (built, random weights; default), default (all-MiniLM-L6-v2) or a model folder")
    p.add_argument("--cache-dir", type=Path, help="graph cache to export into and reuse (default: a temporary one)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budgets", default="8192,16384,32768,65536", help="jobs.embed --max-tokens values to run")
    p.add_argument("--st-batch-sizes", default="32,128,512")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_results.json")
    args = p.parse_args()

    budgets = [int(b) for b in args.budgets.split(",")]
    precisions = ["fp32", "fp16"] if args.device.startswith("cuda") else ["fp32"]
    peer_backend = "torch-fp16" if args.device.startswith("cuda") else "torch"
    with tempfile.TemporaryDirectory(prefix="embedder-gpu-bench-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus.parquet"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(corpus),
                        "--rows", str(args.rows)], check=True, capture_output=True)
        model = model_folder(args.model, work, args.layers)
        cache = args.cache_dir or work / "cache"
        for precision in precisions:  # exported outside the timed runs
            subprocess.run([sys.executable, "-m", "jobs.export", "--model", str(model), "--cache-dir", str(cache),
                            "--precision", precision], cwd=ROOT, check=True, capture_output=True)
        results, vectors = [], {}
        for precision in precisions:
            for budget in budgets:
                result, vectors[(precision, budget)] = run_job(corpus, model, cache, args.device, precision, budget,
                                                               work)
                results.append(result)
                print(json.dumps(result), file=sys.stderr)
        peers = []
        for batch_size in (int(b) for b in args.st_batch_sizes.split(",")):
            result, vectors[("st", batch_size)] = run_peer(corpus, model, args.device, peer_backend, batch_size, work)
            peers.append(result)
            print(json.dumps(result), file=sys.stderr)

    best_peer = max(peers, key=lambda r: r["tokens_per_second"])
    st_vectors = vectors[("st", best_peer["batch_size"])]
    for result in results:
        ours = vectors[(result["engine"].split()[-1], result["max_tokens"])]
        result["ratio_to_best_st"] = result["tokens_per_second"] / best_peer["tokens_per_second"]
        result["min_cosine_to_st"] = min_cosine(ours, st_vectors)
        result["min_cosine_to_embedder_fp32"] = min_cosine(ours, vectors[("fp32", result["max_tokens"])])
    described = ("BERT-base shape, random weights, mean pooling, normalize" if args.model == "bert-base"
                 else str(model))
    summary = {"device": args.device, "gpu": _gpu_name(), "rows": args.rows,
               "layers": args.layers if args.model == "bert-base" else None,
               "model": described, "date": time.strftime("%Y-%m-%d"),
               **headline(results, best_peer),
               "embedder": results, "sentence_transformers": peers, "best_st_batch_size": best_peer["batch_size"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "none"


if __name__ == "__main__":
    sys.exit(main())
