"""Everything this project needs a GPU to show, in one run: the figures land in one JSON file.

    bash scripts/gpu_check.sh $OUT/gpu_results.json      # on the GPU machine (installs the bundle first)
    python scripts/gpu_check.py --out /tmp/r.json        # where onnxruntime-gpu and CUDA are already installed
    python scripts/gpu_check.py --out /tmp/r.json --device cpu --rows 300 --budgets 2048 --memory-rows 2000 \
        --layers 2                                       # a dry run of the script's mechanics, no GPU

Steps, each given what is left of --budget seconds (the JSON is rewritten after every step, so a run
cut short still reports what it finished):
  1. providers: onnxruntime's version and file, its available providers, and a session that must run
     on CUDAExecutionProvider (a silent CPU fallback stops the check here, exit 1).
  2. tests: `pytest -m gpu` (parity with sentence-transformers on CUDA, fp32 and fp16, every family).
  3. precision_profile: the default model's fp32 and fp16 graphs on the same batches, replayed and with
     shapes the session has not seen, per operator and provider; then the same timings in a process per
     attention-kernel variant (ATTENTION_VARIANTS).
  4. io_binding: the default model's fp16 graph on the job's batch shapes, session.run against IO binding
     with inputs and outputs on the GPU: what the host copies cost.
  5. memory: jobs.embed on --memory-rows docstring rows in windows of 2,000 while GPU memory is sampled:
     the arena must stop growing once it has seen the largest batch.
  6. bench_default, bench_bert_base: scripts/bench_gpu.py on all-MiniLM-L6-v2 and on a BERT-base-shaped
     model: jobs.embed fp32 and fp16 at --budgets against sentence-transformers fp16 at --st-batch-sizes.
Headline keys: gpu, fp16_vs_st_fp16 and fp16_min_cosine (default model), plus every figure behind them.
Graphs are exported once into --cache-dir (tests and benches share it), which a rerun on the same machine reuses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


STEPS = ("tests", "precision_profile", "io_binding", "memory", "bench_default", "bench_bert_base")


class Check:
    """The results file, rewritten after each step, and the time left for the next one."""

    def __init__(self, out: Path, budget: float):
        self.out, self.deadline = out, time.monotonic() + budget
        self.results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": gpu_name(), "steps": {}}
        self.log = out.with_suffix(".log")
        self.log.write_text("")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, step: str, figures: dict) -> None:
        self.results["steps"][step] = figures
        self.out.write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def run(self, step: str, argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess | None:
        """A subprocess whose output goes to the log; None (and a recorded reason) if time is out."""
        if timeout < 10:
            self.record(step, {"skipped": f"out of time ({self.left():.0f} s left)"})
            return None
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired as e:
            self._append(step, argv, _text(e.stdout), _text(e.stderr))
            self.record(step, {"error": f"timed out after {timeout:.0f} s"})
            return None
        self._append(step, argv, proc.stdout, proc.stderr)
        print(f"{step}: exit {proc.returncode} in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        return proc

    def _append(self, step: str, argv: list[str], stdout: str, stderr: str) -> None:
        with self.log.open("a") as f:
            f.write(f"===== {step}: {' '.join(argv)}\n{stdout}\n----- stderr\n{stderr}\n")


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "none (nvidia-smi did not answer)"


def gpu_memory_used_mb() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def check_providers() -> dict:
    """onnxruntime as imported here, and one tiny graph that must really run on CUDA."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from embedder.infer.devices import CUDA, cuda_device_count, preload_cuda_libraries

    figures = {"onnxruntime": ort.__version__, "onnxruntime_file": ort.__file__,
               "available_providers": ort.get_available_providers(), "cuda_devices": cuda_device_count()}
    preload_cuda_libraries()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double", [x], [y])
    # IR version 10: what onnxruntime 1.20 and later load (a newer onnx writes a newer one by default).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "double.onnx"
        onnx.save(model, str(path))
        session = ort.InferenceSession(str(path), providers=[CUDA, "CPUExecutionProvider"])
        figures["session_providers"] = session.get_providers()
        result = session.run(["y"], {"x": np.arange(4, dtype=np.float32)})[0]
    figures["cuda_session"] = figures["session_providers"][0] == CUDA and result.tolist() == [0.0, 2.0, 4.0, 6.0]
    return figures


def pytest_summary(proc: subprocess.CompletedProcess) -> dict:
    tail = proc.stdout.strip().splitlines()
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                                     tail[-1] if tail else "")}
    failures = [line for line in tail if line.startswith(("FAILED", "ERROR"))]
    return {"exit": proc.returncode, "summary": tail[-1] if tail else "", "counts": counts, "failures": failures}


def docstring_texts(rows: int) -> list[str]:
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.parquet"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(corpus), "--rows",
                        str(rows)], check=True, capture_output=True)
        return [t for t in pq.read_table(corpus, columns=["text"]).column("text").to_pylist() if t is not None]


def io_binding_probe(cache: Path, rows: int) -> dict:
    """session.run (numpy in, numpy out) against IO binding (ids already on the GPU, vectors left there)."""
    import numpy as np
    import onnxruntime as ort
    from bench_common import padded_batches

    from embedder import ExportOptions, get_or_export, load_spec
    from embedder.infer.devices import DEVICE_KINDS
    from embedder.infer.session import create_encoder
    from embedder.infer.tokenize import TextTokenizer

    artifact = get_or_export(load_spec(None), ExportOptions(precision="fp16"), cache)
    encoder = create_encoder(artifact.graphs, "cuda", precision="fp16")
    tokens = TextTokenizer(artifact.tokenizer_path, artifact.manifest.max_seq_length).encode(docstring_texts(rows))
    batches = padded_batches(artifact, tokens, DEVICE_KINDS["cuda"].default_max_tokens)
    session = encoder.session
    has_types = "token_type_ids" in encoder.input_names

    def plain() -> float:
        started = time.perf_counter()
        for b in batches:
            encoder(b.input_ids, b.attention_mask)
        return time.perf_counter() - started

    def bound() -> float:
        device_inputs = []
        for b in batches:  # the ids are put on the GPU before the clock starts: only the graph is timed
            feeds = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
            if has_types:
                feeds["token_type_ids"] = np.zeros_like(b.input_ids)
            device_inputs.append({k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()})
        started = time.perf_counter()
        for feeds in device_inputs:
            binding = session.io_binding()
            for name, value in feeds.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("sentence_embedding", "cuda", 0)
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        return time.perf_counter() - started

    plain(), bound()  # warm-up: kernels load, the arena grows
    plain_s, bound_s = [], []
    for _ in range(3):
        plain_s.append(plain())
        bound_s.append(bound())
    real = sum(b.real_tokens for b in batches)
    return {"rows": rows, "batches": len(batches), "real_tokens": real,
            "session_run_seconds": min(plain_s), "io_binding_seconds": min(bound_s),
            "copy_share": 1 - min(bound_s) / min(plain_s),
            "note": "copy_share: the part of session.run's time that IO binding with device-resident ids saves"}


# Attention kernels onnxruntime's CUDA provider picks among for fp16 (read once per process from these
# variables): each variant runs in its own process, on the same batches as precision_profile.
ATTENTION_VARIANTS = {
    "default": {},  # the same timing without the profiler, to compare the others with
    "no_trt_kernels": {"ORT_DISABLE_TRT_FLASH_ATTENTION": "1", "ORT_DISABLE_FUSED_ATTENTION": "1"},
    "no_flash_no_efficient": {"ORT_DISABLE_FLASH_ATTENTION": "1", "ORT_DISABLE_MEMORY_EFFICIENT_ATTENTION": "1"},
    "unfused_only": {"ORT_DISABLE_TRT_FLASH_ATTENTION": "1", "ORT_DISABLE_FUSED_ATTENTION": "1",
                     "ORT_DISABLE_FLASH_ATTENTION": "1", "ORT_DISABLE_MEMORY_EFFICIENT_ATTENTION": "1"},
}


def precision_profile(cache: Path, rows: int, profile: bool = True) -> dict:
    """fp32 against fp16 on the same batches, per operator and provider from onnxruntime's profiler.

    Where fp16 runs slower than fp32, this says why: nodes onnxruntime placed on the CPU (with copies around
    them), operators without a fused fp16 kernel, casts, or a cost per new input shape (the H200 run of
    2026-12-04: fp16 4.7x fp32 on replayed batches, 0.17x in the job, whose batches bring new shapes).
    The profile covers every pass. profile=False times the runs only.
    """
    import collections

    import numpy as np
    import onnx
    import onnxruntime as ort
    from bench_common import kernel_share, padded_batches

    from embedder import ExportOptions, get_or_export, load_spec
    from embedder.infer.devices import CUDA, DEVICE_KINDS, cuda_options
    from embedder.infer.tokenize import TextTokenizer

    figures: dict = {}
    texts = docstring_texts(rows)
    for precision in ("fp32", "fp16"):
        artifact = get_or_export(load_spec(None), ExportOptions(precision=precision), cache)
        graph = artifact.graphs["cuda"]
        tokens = TextTokenizer(artifact.tokenizer_path, artifact.manifest.max_seq_length).encode(texts)
        batches = padded_batches(artifact, tokens, DEVICE_KINDS["cuda"].default_max_tokens)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_mem_pattern = False
        options.enable_profiling = profile
        if profile:  # what the CUDA provider's fusions made of the graph
            options.optimized_model_filepath = str(cache / f"optimized-{precision}.onnx")
        session = ort.InferenceSession(str(graph), sess_options=options,
                                       providers=[(CUDA, cuda_options(0)), "CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}

        def feeds(extra: int) -> list[dict]:
            # extra > 0 pads every batch by that many more masked columns: shapes this session has not seen
            # (the job's windows bring new shapes all along), with the same vectors.
            made = []
            for b in batches:
                ids = np.pad(b.input_ids, ((0, 0), (0, extra)), constant_values=artifact.manifest.pad_token_id)
                made.append({"input_ids": ids, "attention_mask": np.pad(b.attention_mask, ((0, 0), (0, extra)))}
                            | ({"token_type_ids": np.zeros_like(ids)} if "token_type_ids" in names else {}))
            return made

        def run_all(fed: list[dict]) -> float:  # the feeds are made before the clock starts
            started = time.perf_counter()
            for f in fed:
                session.run(["sentence_embedding"], f)
            return time.perf_counter() - started

        real = sum(b.real_tokens for b in batches)
        replayed = feeds(0)
        first = run_all(replayed)  # the first pass meets every shape once: kernels load, the arena grows
        seconds = min(run_all(replayed) for _ in range(2))
        shapes = [b.input_ids.shape for b in batches]
        seen = set(shapes)
        novel = []
        for _ in range(2):  # each pass pads by the fewest columns that give every batch a shape not run before
            extra = next(e for e in range(1, 1000) if not any((r, n + e) in seen for r, n in shapes))
            seen |= {(r, n + extra) for r, n in shapes}
            novel.append({"extra_columns": extra, "seconds": run_all(feeds(extra))})
        figures[precision] = {"graph": graph.name, "batches": len(batches), "seconds": seconds,
                              "tokens_per_second": real / seconds, "first_pass_seconds": first,
                              "novel_shape_passes": novel,
                              "novel_shapes_tokens_per_second": real / min(p["seconds"] for p in novel)}
        if not profile:
            continue
        kernel_seconds, share = kernel_share(session, by_provider=True)
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
        source_ops = collections.Counter(n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node)
        figures[precision] |= {
            "kernel_share": dict(list(share.items())[:25]),
            "kernel_seconds_profiled_runs": kernel_seconds,
            "source_ops": dict(source_ops.most_common()),
            "optimized_ops": dict(collections.Counter(n.op_type for n in optimized.graph.node).most_common()),
        }
    figures["fp16_over_fp32"] = figures["fp32"]["seconds"] / figures["fp16"]["seconds"]
    figures["fp16_over_fp32_novel_shapes"] = (figures["fp16"]["novel_shapes_tokens_per_second"]
                                              / figures["fp32"]["novel_shapes_tokens_per_second"])
    return figures


def memory_run(check: Check, cache: Path, rows: int, work: Path, device: str) -> dict:
    corpus, out = work / "memory.parquet", work / "memory.vectors.parquet"
    made = check.run("memory_corpus", [sys.executable, "scripts/make_corpus.py", "--out", str(corpus), "--rows",
                                       str(rows)], timeout=min(120, check.left()))
    if made is None or made.returncode != 0:
        return {"error": "could not build the corpus"}
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            used = gpu_memory_used_mb()
            if used is not None:
                samples.append((round(time.monotonic() - started, 2), used))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    metrics = work / "memory.metrics.json"
    proc = check.run("memory", [sys.executable, "-m", "jobs.embed", "--in", str(corpus), "--out", str(out),
                                "--overwrite", "--device", device, "--cache-dir", str(cache), "--window-rows", "2000",
                                "--progress", "on", "--metrics-out", str(metrics)], timeout=min(90, check.left() - 5))
    stop.set()
    sampler.join()
    figures: dict = {"rows": rows, "window_rows": 2000, "samples_mb": samples}
    if proc is None or proc.returncode != 0:
        figures["error"] = "the job failed; see the log"
        return figures
    figures["metrics"] = json.loads(metrics.read_text())
    used = [mb for _, mb in samples]
    if len(used) >= 8:
        half = len(used) // 2
        figures["peak_first_half_mb"], figures["peak_second_half_mb"] = max(used[:half]), max(used[half:])
        # Bounded: once the largest batch has run (warm-up runs it first), later windows add nothing.
        figures["arena_bounded"] = max(used[half:]) <= max(used[:half]) * 1.05
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results JSON (a .log with every subprocess's output beside it)")
    p.add_argument("--budget", type=float, default=400, help="seconds for all steps (default 400)")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "embedder-gpu-cache")
    p.add_argument("--rows", type=int, default=20000, help="bench rows (default 20000)")
    p.add_argument("--budgets", default="16384,65536", help="--max-tokens values the bench sweeps")
    p.add_argument("--st-batch-sizes", default="128,512", help="sentence-transformers batch sizes the bench runs")
    p.add_argument("--memory-rows", type=int, default=50000)
    p.add_argument("--layers", type=int, default=12, help="layers of the BERT-base-shaped model (default 12)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu is a dry run of the script itself")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma list of steps to run (default all: {','.join(STEPS)}); a rerun can pick the missing ones")
    p.add_argument("--time-graphs", action="store_true", help=argparse.SUPPRESS)  # one attention variant's timing
    args = p.parse_args()
    if args.time_graphs:
        print(json.dumps(precision_profile(args.cache_dir, 4000, profile=False)))
        return 0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.budget)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    # One graph cache for the tests and the benches: the default model is exported once, by the tests.
    env = {"EMBEDDER_TEST_EXPORT_CACHE": str(args.cache_dir), "PYTHONUNBUFFERED": "1"}

    try:
        providers = check_providers()
    except Exception as e:
        providers = {"cuda_session": False, "error": f"{type(e).__name__}: {e}"}
    check.record("providers", providers)
    if not providers.get("cuda_session") and args.device != "cpu":
        print(f"CUDA did not run: {json.dumps(providers)}", file=sys.stderr)
        return 1

    steps = set(args.steps.split(","))
    unknown = steps - set(STEPS)
    if unknown:
        p.error(f"unknown steps: {', '.join(sorted(unknown))}")
    proc = None if "tests" not in steps else check.run("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                               "tests/test_gpu.py"], timeout=min(120, check.left() - 150), env=env)
    if proc is not None:
        check.record("tests", pytest_summary(proc))

    if "precision_profile" in steps and check.left() > 60 and args.device != "cpu":
        try:
            figures = precision_profile(args.cache_dir, 4000)
        except Exception as e:
            figures = {"error": f"{type(e).__name__}: {e}"}
        check.record("precision_profile", figures)
        for name, variables in ATTENTION_VARIANTS.items():
            # onnxruntime prints the attention kernel each node runs with this variable set
            proc = check.run(f"attention_{name}", [sys.executable, "scripts/gpu_check.py", "--out", str(args.out),
                                                   "--time-graphs", "--cache-dir", str(args.cache_dir)],
                             timeout=min(60, check.left() - 200),
                             env={**variables, "ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO": "1"})
            try:
                if proc is None or proc.returncode != 0:
                    raise RuntimeError("skipped for time" if proc is None else f"exit {proc.returncode}; see the log")
                lines = proc.stdout.strip().splitlines()
                kernels = sorted({re.sub(r"\x1b\[[0-9;]*m|Node=\S+ ", "", line) for line in lines if "SdpaKernel=" in line})
                timing = next(line for line in reversed(lines) if line.startswith("{"))
                figures[f"attention_{name}"] = {"env": variables, "kernels": kernels, **json.loads(timing)}
            except (RuntimeError, StopIteration, ValueError) as e:
                figures[f"attention_{name}"] = {"env": variables, "error": str(e) or type(e).__name__}
            check.record("precision_profile", figures)

    if "io_binding" in steps and check.left() > 40 and args.device != "cpu":
        try:
            check.record("io_binding", io_binding_probe(args.cache_dir, 4000))
        except Exception as e:
            check.record("io_binding", {"error": f"{type(e).__name__}: {e}"})

    if "memory" in steps:
        with tempfile.TemporaryDirectory() as tmp:
            check.record("memory", memory_run(check, args.cache_dir, args.memory_rows, Path(tmp), args.device))

    for step, model, cap in (("bench_default", "default", 120), ("bench_bert_base", "bert-base", 170)):
        if step not in steps:
            continue
        figures_file = args.out.with_name(f"{step}.json")
        proc = check.run(step, [sys.executable, "scripts/bench_gpu.py", "--model", model, "--rows", str(args.rows),
                                "--budgets", args.budgets, "--st-batch-sizes", args.st_batch_sizes, "--cache-dir", str(args.cache_dir),
                                "--device", args.device, "--layers", str(args.layers),
                                "--out", str(figures_file)], timeout=min(cap, check.left() - 5), env=env)
        if proc is not None:
            check.record(step, json.loads(figures_file.read_text()) if proc.returncode == 0 and figures_file.exists()
                         else {"error": f"exit {proc.returncode}; see the log"})

    default = check.results["steps"].get("bench_default", {})
    check.results.update({key: default.get(key) for key in ("fp16_vs_st_fp16", "fp32_vs_st_fp16",
                                                                "fp16_best_max_tokens", "fp32_best_max_tokens")})
    check.results["fp16_min_cosine"] = default.get("fp16_min_cosine_to_fp32")
    check.results["bert_base_fp16_vs_st_fp16"] = check.results["steps"].get("bench_bert_base", {}).get("fp16_vs_st_fp16")
    check.record("total", {"seconds_left": round(check.left(), 1)})
    print(json.dumps({k: v for k, v in check.results.items() if k != "steps"}, indent=2))
    tests = check.results["steps"].get("tests", {})
    return 0 if tests.get("exit") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
