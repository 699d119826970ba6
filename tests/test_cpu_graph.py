"""embedder.build.cpu_graph: attention's key Transpose folded into FusedMatMul, with identical values."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import ALL_FAMILIES
from onnx import TensorProto, helper

from embedder.build.cpu_graph import fold_key_transposes


def _scores_graph(path, key_perm, extra_consumer=False, heads=3, seq=5, head_dim=4):
    """Q (b, h, s, d) @ Transpose(K (b, s, h, d), key_perm): attention scores the way exporters write them."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=key_perm),
             helper.make_node("MatMul", ["q", "kt"], ["scores"])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)]
    if extra_consumer:  # a Transpose someone else also reads must keep its layout
        nodes.append(helper.make_node("Identity", ["kt"], ["kt_copy"]))
        outputs.append(helper.make_tensor_value_info("kt_copy", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "scores", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, heads, seq, head_dim]),
                                                helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, seq, heads, head_dim])],
                              outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the exporter writes; this onnx defaults to a newer one than onnxruntime reads
    onnx.save(model, str(path))


def _run(path, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the file as written
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_key_transpose_is_folded_and_scores_are_unchanged(tmp_path):
    _scores_graph(tmp_path / "in.onnx", [0, 2, 3, 1])
    assert fold_key_transposes(tmp_path / "in.onnx", tmp_path / "out.onnx") == 1

    model = onnx.load(str(tmp_path / "out.onnx"))
    transpose, matmul = model.graph.node
    assert list(helper.get_attribute_value(transpose.attribute[0])) == [0, 2, 1, 3]  # innermost axis stays put
    assert (matmul.op_type, matmul.domain) == ("FusedMatMul", "com.microsoft")
    assert {a.name: helper.get_attribute_value(a) for a in matmul.attribute}["transB"] == 1

    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((2, 3, 5, 4), dtype=np.float32),
             "k": rng.standard_normal((2, 5, 3, 4), dtype=np.float32)}
    want = np.einsum("bhsd,bthd->bhst", feeds["q"], feeds["k"])
    before, after = _run(tmp_path / "in.onnx", feeds)[0], _run(tmp_path / "out.onnx", feeds)[0]
    np.testing.assert_allclose(before, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(after, before)


@pytest.mark.parametrize("perm, extra_consumer", [([0, 2, 1, 3], False), ([0, 2, 3, 1], True), ([0, 3, 2, 1], False)])
def test_other_transposes_are_left_alone(tmp_path, perm, extra_consumer):
    """Innermost axis already in place, a second reader of the Transpose, or a layout the swap cannot fix.

    Equal head count, length and head size keep every one of these products well formed.
    """
    _scores_graph(tmp_path / "in.onnx", perm, extra_consumer, heads=4, seq=4, head_dim=4)
    assert fold_key_transposes(tmp_path / "in.onnx", tmp_path / "out.onnx") == 0
    assert onnx.load(str(tmp_path / "out.onnx")).graph.node[1].op_type == "MatMul"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_cpu_graph_reads_keys_through_fused_matmul(exported, family):
    """The CPU graph of each family has its key Transposes folded; test_export checks its vectors."""
    artifact = exported(family)
    layers = artifact.manifest.record["cpu_rewrite"]
    model = onnx.load(str(artifact.graphs["cpu"]))
    fused = [n for n in model.graph.node if n.op_type == "FusedMatMul"]
    assert layers["applied"] and layers["folded_transposes"] == len(fused) > 0
    for node in model.graph.node:
        if node.op_type == "Transpose":
            perm = list(helper.get_attribute_value(node.attribute[0]))
            assert perm[-1] == len(perm) - 1, f"{node.name} still moves the innermost axis: {perm}"
