"""The device table: which kinds a run tries, from --device and the kinds a precision runs on."""

from __future__ import annotations

from dataclasses import replace

import pytest

from embedder.config import ExportOptions, JobConfig
from embedder.errors import DeviceError, UsageError
from embedder.infer.devices import DEVICE_KINDS, Device, candidates

CASES = [
    # (precision, --device, kinds tried in order: the last one's failure is an error)
    ("fp32", "auto", ["cuda", "cpu"]),
    ("fp32", "cpu", ["cpu"]),
    ("fp32", "cuda:1", ["cuda"]),
    ("int8", "auto", ["cpu"]),  # nothing for CUDA: auto is the CPU
    ("int8", "cpu", ["cpu"]),
    ("fp16", "auto", ["cuda"]),  # nothing for the CPU: auto must get CUDA or fail
    ("fp16", "cuda", ["cuda"]),
]


@pytest.mark.parametrize(("precision", "device", "kinds"), CASES)
def test_device_kinds_follow_the_precision(precision, device, kinds):
    assert [kind.name for kind in candidates(device, precision)] == kinds


@pytest.mark.parametrize(("text", "parsed"), [("auto", Device("auto")), ("CPU", Device("cpu")),
                                              ("cuda", Device("cuda", 0)), (" cuda:3 ", Device("cuda", 3))])
def test_device_parses_once(text, parsed):
    assert Device.parse(text) == parsed


@pytest.mark.parametrize("text", ["gpu", "cpu:1", "auto:0", "cuda:x", ""])
def test_a_device_outside_the_table_is_refused_naming_the_valid_ones(text):
    with pytest.raises(UsageError, match="is not one of: auto, cuda, cuda:N, cpu|auto takes no index"):
        Device.parse(text)


def test_a_new_row_is_all_it_takes_to_add_a_device_kind(exported, monkeypatch):
    """An execution provider added as one row: --device names it, precisions follow it, sessions open on it."""
    from embedder.infer.session import create_encoder

    row = replace(DEVICE_KINDS["cpu"], name="other", label="another CPU", precisions=("fp32",),
                  default_max_tokens=333)
    monkeypatch.setitem(DEVICE_KINDS, "other", row)
    assert [k.name for k in candidates("auto", "fp32")] == ["cuda", "cpu", "other"]
    assert [k.name for k in candidates("other", "fp32")] == ["other"]
    with pytest.raises(UsageError, match="--precision int8 runs on the CPU provider only"):
        candidates("other", "int8")
    artifact = exported("bert")
    encoder = create_encoder({"other": artifact.graphs["cpu"]}, "other")
    assert encoder.kind is row and encoder.device == "other" and encoder.provider == "CPUExecutionProvider"
    with pytest.raises(DeviceError, match="no graph for cpu"):
        create_encoder({"other": artifact.graphs["cpu"]}, "cpu")


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
    import embedder.infer.window as encode
    from embedder.infer.session import create_encoder

    artifact = exported("default")
    shapes = []
    real_create = create_encoder

    def labelled_cuda(graphs, device, threads, precision):
        encoder = replace(real_create(graphs, "cpu", threads, precision), kind=DEVICE_KINDS["cuda"], device="cuda:0")
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

    monkeypatch.setitem(DEVICE_KINDS, "cuda", replace(DEVICE_KINDS["cuda"], problem=lambda index: None))
    monkeypatch.setattr(runtime, "_session", session)
    encoder = runtime.create_encoder(artifact.graphs, device)
    assert encoder.provider == provider and encoder.graph == artifact.graphs[graph] == opened[-1]
