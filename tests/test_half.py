"""--precision fp16: a gated half-precision graph for CUDA, pooling and normalization kept in fp32.

No GPU here: the graph is checked on the CPU provider, which runs it with onnxruntime's casts, and
the job's refusals are checked where CUDA is missing.
"""

from __future__ import annotations

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from models import TEXTS, cosines, onnx_vectors

import embedder.build.half as half
import embedder.infer.devices as devices
from embedder import ExportOptions, get_or_export, load_spec
from embedder.errors import EXIT_RUNTIME, EXIT_USAGE, ExportError
from embedder.infer.devices import CPU, CUDA
from embedder.infer.graph_info import read_graph_info
from jobs.embed import main as embed_main

pytestmark = pytest.mark.slow


def test_fp16_graph_is_half_inside_and_fp32_at_its_edges(exported):
    fp16_artifact = exported("bert", precision="fp16")
    manifest = fp16_artifact.manifest
    assert manifest.precision == "fp16" and manifest.graphs == {"cuda": "model.onnx"}
    graph = onnx.load(str(fp16_artifact.graph_path)).graph
    matrices = {t.name: t.data_type for t in graph.initializer if len(t.dims) == 2}
    dense = {name: kind for name, kind in matrices.items() if name.startswith("dense.")}
    transformer = {name: kind for name, kind in matrices.items() if name not in dense}
    assert transformer and set(transformer.values()) == {onnx.TensorProto.FLOAT16}
    assert dense and set(dense.values()) == {onnx.TensorProto.FLOAT}  # this tiny BERT has a Dense layer
    # Same interface as fp32 (int64 ids in, float32 vectors out), so the job feeds it unchanged.
    fp32_info = read_graph_info(exported("bert").graph_path)
    assert read_graph_info(fp16_artifact.graph_path).inputs == fp32_info.inputs
    assert read_graph_info(fp16_artifact.graph_path).outputs == fp32_info.outputs
    # This BERT's Dense layer (Gemm) and normalize (ReduceL2) are among the nodes kept fp32, and every
    # tensor they read or write is fp32 in the converted graph (casts sit at the boundary).
    kept = manifest.record["fp16"]["fp32_nodes"]
    ops = {n.name: n.op_type for n in graph.node}
    assert {"Gemm", "ReduceL2"} <= {ops[name] for name in kept}
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_artifact.graph_path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    types |= {t.name: t.data_type for t in inferred.initializer}
    for node in inferred.node:
        if node.name in kept:
            used = {types.get(name) for name in [*node.input, *node.output] if name}
            assert onnx.TensorProto.FLOAT16 not in used and onnx.TensorProto.FLOAT in used, node.name
    gate = manifest.record["fp16"]["gate"]
    assert gate["min_cosine"] >= gate["threshold"] == 0.999 and gate["texts"] >= 32
    # The provider that really ran the gate: the CPU where CUDA cannot run, as here.
    assert gate["provider"] == (CPU if devices.cuda_problem() else CUDA)


# CLS + Dense + normalize; mean pooling, no normalize; last-token pooling (whose squeeze once exported an If that
# onnxruntime's float16 converter broke)
@pytest.mark.parametrize("family", ["bert", "roberta", "bert_lasttoken"])
def test_fp16_vectors_stay_close_to_fp32_on_other_text(exported, family):
    got = onnx_vectors(exported(family, precision="fp16"), TEXTS, graph="cuda")  # the CUDA graph, run on the CPU provider
    want = onnx_vectors(exported(family), TEXTS)
    assert np.isfinite(got).all() and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-3)
    assert cosines(got, want).min() >= 0.999


def test_fp16_that_cannot_pass_the_gate_is_refused(model_zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(half, "MIN_COSINE", 1.0 + 1e-6)  # no fp16 graph can reach it
    with pytest.raises(ExportError, match="fp16 graph fails its gate"):
        get_or_export(load_spec(model_zoo.model_arg("bert")), ExportOptions(precision="fp16"), tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").glob("*/*") if p.is_dir()]  # nothing half-made is cached


@pytest.mark.parametrize(("device", "code", "message"), [
    ("cpu", EXIT_USAGE, "fp16 runs on CUDA only"),
    ("auto", EXIT_RUNTIME, "--precision fp16 needs CUDA"),  # auto cannot mean a CPU run for fp16
])
def test_fp16_without_cuda_is_refused(exported, model_zoo, export_cache_dir, tmp_path, capsys, monkeypatch,
                                      device, code, message):
    exported("bert", precision="fp16")  # the graph is cached: the refusal is about the device, not the export
    monkeypatch.setattr(devices, "cuda_device_count", lambda: "no NVIDIA driver (simulated)")
    corpus = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), corpus)
    rc = embed_main(["--in", str(corpus), "--out", str(tmp_path / "out.parquet"), "--precision", "fp16",
                     "--device", device, "--model", model_zoo.model_arg("bert"), "--cache-dir", str(export_cache_dir)])
    err = capsys.readouterr().err
    assert rc == code and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.parquet").exists()
