"""Which device kind a run tries, from --device and the kinds a precision's graphs exist for."""

from __future__ import annotations

import pytest

from embedder.config import PRECISIONS, ExportOptions, JobConfig
from embedder.errors import UsageError
from embedder.infer.session import resolve_kind

CASES = [
    # (precision, --device, kind tried)
    ("fp32", "auto", "auto"),
    ("fp32", "cpu", "cpu"),
    ("fp32", "cuda:1", "cuda"),
    ("int8", "auto", "cpu"),  # nothing for CUDA: auto is the CPU
    ("int8", "cpu", "cpu"),
    ("fp16", "auto", "cuda"),  # nothing for the CPU: auto must get CUDA or fail
    ("fp16", "cuda", "cuda"),
]


@pytest.mark.parametrize(("precision", "device", "kind"), CASES)
def test_device_kind_follows_the_precisions_graphs(precision, device, kind):
    assert resolve_kind(PRECISIONS[precision], device, precision) == kind


@pytest.mark.parametrize(("precision", "device", "message"), [
    ("int8", "cuda", "int8 runs on the CPU provider only"),
    ("fp16", "cpu", "fp16 runs on CUDA only"),
    ("fp32", "gpu", "is not one of"),
])
def test_a_device_the_precision_cannot_use_is_refused_before_any_work(tmp_path, precision, device, message):
    from embedder.run.local import run

    config = JobConfig(inputs=str(tmp_path / "missing.parquet"), output=tmp_path / "out.parquet", device=device,
                       export=ExportOptions(precision=precision), cache_dir=tmp_path / "cache")
    with pytest.raises(UsageError, match=message):  # not the missing input, not an export: the device comes first
        run(config)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_cuda_runs_warm_up_once_at_the_largest_batch_shape(exported, monkeypatch):
    """Without a GPU here: a CPU session labelled CUDA shows what WindowEmbedder asks of it."""
    from dataclasses import replace

    import embedder.infer.window as encode
    from embedder.infer.session import CUDA, create_encoder

    artifact = exported("default")
    shapes = []
    real_create = create_encoder

    def labelled_cuda(graphs, device, threads, precision):
        encoder = replace(real_create(graphs, "cpu", threads, precision), provider=CUDA, device="cuda:0")
        original = encoder.warm_up
        encoder.warm_up = lambda rows, length: (shapes.append((rows, length)), original(rows, length))
        return encoder

    monkeypatch.setattr(encode, "create_encoder", labelled_cuda)
    embedder = encode.WindowEmbedder(artifact, "cpu")
    # 16384 tokens on CUDA at max_seq_length 256: 64 rows of 256 tokens, the biggest batch plan_batches makes.
    assert embedder.batching.max_tokens == 16384 and shapes == [(64, 256)]


@pytest.mark.slow
@pytest.mark.parametrize(("device", "cuda_loads", "graph", "provider"), [
    ("cuda", True, "cuda", "CUDAExecutionProvider"),
    ("auto", True, "cuda", "CUDAExecutionProvider"),
    ("auto", False, "cpu", "CPUExecutionProvider"),  # CUDA did not load: auto falls back to the CPU graph
    ("cpu", True, "cpu", "CPUExecutionProvider"),
])
def test_each_device_opens_its_own_graph(exported, monkeypatch, device, cuda_loads, graph, provider):
    """No GPU here: sessions are CPU sessions that report the provider a GPU host would give them."""
    import embedder.infer.session as runtime

    artifact = exported("default")
    opened = []
    real_session = runtime._session

    class Reported:
        def __init__(self, session, providers):
            self._session, self._providers = session, providers

        def get_providers(self):
            return self._providers

        def __getattr__(self, name):
            return getattr(self._session, name)

    def session(ort, path, providers, threads):
        opened.append(path)
        asked = [p[0] if isinstance(p, tuple) else p for p in providers]
        got = asked if cuda_loads else [runtime.CPU]
        return Reported(real_session(ort, path, [runtime.CPU], threads), got)

    monkeypatch.setattr(runtime, "cuda_problem", lambda index=0: None)
    monkeypatch.setattr(runtime, "_session", session)
    encoder = runtime.create_encoder(artifact.graphs, device)
    assert encoder.provider == provider and encoder.graph == artifact.graphs[graph] == opened[-1]
