"""--precision int8: a gated int8 graph for the CPU (tiny BERT; the gate's figures in the manifest)."""

from __future__ import annotations

import numpy as np
import pytest
from models import TEXTS, cosines, onnx_vectors

import embedder.build.quantize as quantize
from embedder import ExportOptions, get_or_export, load_spec
from embedder.errors import ExportError
from embedder.infer.graph_info import read_graph_info
from jobs.embed import main as embed_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_artifact(exported):
    return exported("bert", precision="int8")


def test_int8_graph_passes_its_gate_and_records_it(int8_artifact, exported):
    manifest = int8_artifact.manifest
    fp32 = exported("bert")
    assert manifest.precision == "int8" and int8_artifact.folder != fp32.folder
    gate = manifest.record["quantization"]["gate"]
    assert gate["min_cosine"] >= gate["threshold"] == 0.99 and gate["texts"] >= 32
    assert manifest.record["quantization"]["quantized_nodes"] > 0
    # Same interface as the fp32 graph, so the job feeds it the same way.
    assert read_graph_info(int8_artifact.graph_path).inputs == read_graph_info(fp32.graph_path).inputs
    ops = {n.op_type for n in __import__("onnx").load(str(int8_artifact.graph_path)).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "QAttention", "DynamicQuantizeLinear"}


def test_int8_vectors_stay_close_to_fp32_on_other_text(int8_artifact, exported):
    got, want = onnx_vectors(int8_artifact, TEXTS), onnx_vectors(exported("bert"), TEXTS)
    assert np.isfinite(got).all()
    assert cosines(got, want).min() >= 0.99


def test_int8_that_cannot_pass_the_gate_is_refused(model_zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "MIN_COSINE", 1.0 + 1e-6)  # no quantized node can reach it
    with pytest.raises(ExportError, match="cannot reach min cosine"):
        get_or_export(load_spec(model_zoo.model_arg("bert")), ExportOptions(precision="int8"), tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").glob("*/*") if p.is_dir()]  # nothing half-made is cached


def test_int8_on_cuda_is_refused(tmp_path, model_zoo, export_cache_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), corpus)
    rc = embed_main(["--in", str(corpus), "--out", str(tmp_path / "out.parquet"), "--precision", "int8",
                     "--device", "cuda", "--model", model_zoo.model_arg("bert"), "--cache-dir", str(export_cache_dir)])
    assert rc == 2
    assert "int8 runs on the CPU provider only" in capsys.readouterr().err
    assert not (tmp_path / "out.parquet").exists()
