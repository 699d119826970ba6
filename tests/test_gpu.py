"""On CUDA: the vectors of every family equal sentence-transformers', fp16 stays within its gate, the job
runs there end to end, and a device that cannot be had is one line and an exit code.

The tests marked `gpu` need onnxruntime's CUDA provider and an NVIDIA device; elsewhere they are
skipped with the reason CUDA cannot run (`python -m pytest -m gpu` selects them on a GPU host,
`scripts/gpu_check.py` runs them there). The tests without the mark run everywhere: on a CPU host
they show the same refusals for real.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from models import (
    ALL_FAMILIES,
    REPO_ROOT,
    TEXTS,
    assert_vectors_match,
    corpus_lines,
    cosines,
    module_command,
    onnx_vectors,
    reference_vectors,
)

# fp16 against sentence-transformers' fp32 vectors: the gate's threshold (README, --precision).
FP16_MIN_COSINE = 0.999
# Real text of many lengths, so batches of several shapes run (the arena and kernels see variety).
GPU_TEXTS = TEXTS + corpus_lines()[:300]


@pytest.fixture(scope="module")
def cuda_devices() -> int:
    """The number of CUDA devices; skips the test where onnxruntime cannot use CUDA here."""
    from embedder.infer.devices import cuda_device_count, cuda_problem

    reason = cuda_problem()
    if reason is not None:
        pytest.skip(f"needs CUDA: {reason}")
    return cuda_device_count()


def embed_command(corpus, out, *args) -> list[str]:
    return module_command("jobs.embed", "--in", corpus, "--out", out, "--progress", "off", *args)


def assert_one_line_refusal(proc: subprocess.CompletedProcess, code: int, message: str, out) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert lines[-1].startswith("jobs.embed: error: ") and message in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(out)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fp32_on_cuda_equals_sentence_transformers(cuda_devices, exported, model_zoo, family):
    got = onnx_vectors(exported(family), GPU_TEXTS, max_tokens=4096, max_batch_size=64, graph="cuda",
                       device="cuda")
    assert_vectors_match(got, reference_vectors(model_zoo.path(family), GPU_TEXTS))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fp16_on_cuda_stays_within_its_gate_of_sentence_transformers(cuda_devices, exported, model_zoo, family):
    artifact = exported(family, precision="fp16")
    assert artifact.manifest.record["fp16"]["gate"]["provider"] == "CUDAExecutionProvider"  # gated where it runs
    got = onnx_vectors(artifact, GPU_TEXTS, max_tokens=4096, max_batch_size=64, graph="cuda", device="cuda")
    want = reference_vectors(model_zoo.path(family), GPU_TEXTS)
    assert np.isfinite(got).all() and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    assert cosines(got, want).min() >= FP16_MIN_COSINE


@pytest.fixture(scope="module")
def gpu_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-corpus") / "in.parquet"
    texts = [t if i % 17 else None for i, t in enumerate(GPU_TEXTS)]  # some nulls among them
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path)
    return path, texts


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_job_runs_on_cuda_rows_in_order(cuda_devices, exported, model_zoo, export_cache_dir, gpu_corpus,
                                        tmp_path, device):
    exported("default")
    corpus, texts = gpu_corpus
    out, metrics = tmp_path / "out.parquet", tmp_path / "metrics.json"
    proc = subprocess.run(embed_command(corpus, out, "--device", device, "--cache-dir", export_cache_dir,
                                        "--window-rows", "128", "--metrics-out", metrics),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(metrics.read_text())
    assert figures["provider"] == "CUDAExecutionProvider" and figures["device"] == "cuda:0"  # auto took CUDA
    assert figures["batching"]["max_tokens"] > 1024  # the CUDA default budget, not the CPU one
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == list(range(len(texts)))
    vectors = table.column("embedding").to_pylist()
    assert [v is None for v in vectors] == [t is None for t in texts]
    got = np.array([v for v in vectors if v is not None], dtype=np.float32)
    want = reference_vectors(model_zoo.path("default"), [t for t in texts if t is not None])
    assert cosines(got, want).min() >= 0.99999


@pytest.mark.gpu
def test_a_cuda_index_past_the_last_device_is_one_line(cuda_devices, exported, export_cache_dir, gpu_corpus,
                                                       tmp_path):
    exported("default")
    out = tmp_path / "out.parquet"
    proc = subprocess.run(embed_command(gpu_corpus[0], out, "--device", f"cuda:{cuda_devices}", "--cache-dir",
                                        export_cache_dir),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    noun = "device" if cuda_devices == 1 else "devices"
    assert_one_line_refusal(proc, 1, f"--device cuda:{cuda_devices}: this machine has {cuda_devices} CUDA {noun}",
                            out)


def test_cuda_that_cannot_load_is_one_line_and_exit_1(exported, export_cache_dir, gpu_corpus, tmp_path):
    """CUDA hidden from the process (on a GPU host) or absent (elsewhere): never a silent CPU run."""
    exported("default")
    out = tmp_path / "out.parquet"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(embed_command(gpu_corpus[0], out, "--device", "cuda", "--cache-dir", export_cache_dir),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert_one_line_refusal(proc, 1, "--device cuda: ", out)


def test_fp16_on_the_cpu_is_refused_before_any_export(gpu_corpus, tmp_path):
    out, cache = tmp_path / "out.parquet", tmp_path / "cache"
    proc = subprocess.run(embed_command(gpu_corpus[0], out, "--device", "cpu", "--precision", "fp16",
                                        "--cache-dir", cache),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert_one_line_refusal(proc, 2, "--precision fp16 runs on CUDA only", out)
    assert not cache.exists() or not any(cache.iterdir())  # refused before exporting anything
