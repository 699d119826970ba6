"""jobs.inspect and embedder.infer.graph_info: what a graph declares, printed exactly; and what the Encoder feeds."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import numpy as np
import onnx
import pytest
from models import ALL_FAMILIES, REPO_ROOT, TOKEN_TYPE_FAMILIES, module_command
from onnx import TensorProto, helper

from embedder.errors import EXIT_USAGE
from embedder.infer.session import create_encoder
from jobs.inspect import main as inspect_main

BASE_INPUTS = ["input_ids", "attention_mask"]


def run_inspect(argv: list[str], capsys) -> tuple[int, str, str]:
    """jobs.inspect main in-process: (exit code, stdout, stderr of this call only)."""
    capsys.readouterr()
    code = inspect_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def declared(values, hidden: set[str] = frozenset()) -> list[dict]:
    """Name, numpy dtype name and dims (int, axis name, or None) of graph values, read straight from the proto."""
    rows = []
    for value in values:
        if value.name in hidden:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
                for d in tensor.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        rows.append({"name": value.name, "dtype": dtype, "shape": dims})
    return rows


def declared_interface(path) -> dict:
    """What jobs.inspect --json must print, computed independently from the ONNX proto."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return {
        "inputs": declared(model.graph.input, initializers),
        "outputs": declared(model.graph.output),
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
    }


def table(path, interface: dict) -> str:
    """The text table jobs.inspect prints for an interface."""
    def row(t):
        dims = ", ".join("?" if d is None else str(d) for d in t["shape"])
        return f"  {t['name']}  {t['dtype']}  [{dims}]"

    lines = [f"graph: {path} (opset {interface['opset']})", "inputs:"]
    lines += [row(t) for t in interface["inputs"]] + ["outputs:"] + [row(t) for t in interface["outputs"]]
    return "\n".join(lines) + "\n"


def foreign_graph(path):
    """A graph this project did not write: named, fixed, unnamed and no dims, several dtypes, and an
    initializer listed among the inputs (as old exporters did), which a caller never feeds."""
    batch_seq = ["batch", "seq"]
    inputs = [
        helper.make_tensor_value_info("tokens", TensorProto.INT64, batch_seq),
        helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("flags", TensorProto.BOOL, [None, 4]),
    ]
    outputs = [
        helper.make_tensor_value_info("scaled", TensorProto.FLOAT, batch_seq),
        helper.make_tensor_value_info("half", TensorProto.FLOAT16, batch_seq),
        helper.make_tensor_value_info("inverted", TensorProto.BOOL, [None, 4]),
        helper.make_tensor_value_info("count", TensorProto.INT64, []),
    ]
    nodes = [
        helper.make_node("Cast", ["tokens"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_float", "scale"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["half"], to=TensorProto.FLOAT16),
        helper.make_node("Not", ["flags"], ["inverted"]),
        helper.make_node("Size", ["tokens"], ["count"]),
    ]
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph(nodes, "foreign", inputs, outputs, initializer=[scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="someone-else")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Graphs this project exported


@pytest.mark.slow
def test_bert_graph_prints_its_declared_names_and_symbolic_axes(exported, capsys):
    graph = exported("bert").graph_path
    code, out, err = run_inspect([graph], capsys)
    assert (code, err) == (0, "")
    assert out == (
        f"graph: {graph} (opset 17)\n"
        "inputs:\n"
        "  input_ids  int64  [batch, sequence]\n"
        "  attention_mask  int64  [batch, sequence]\n"
        "  token_type_ids  int64  [batch, sequence]\n"
        "outputs:\n"
        "  sentence_embedding  float32  [batch, 16]\n"
    )
    assert out == table(graph, declared_interface(graph))


@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_json_lists_exactly_the_declared_interface(exported, capsys, family):
    artifact = exported(family)
    code, out, err = run_inspect([artifact.graph_path, "--json"], capsys)
    assert (code, err) == (0, "")
    printed = json.loads(out)
    assert printed == declared_interface(artifact.graph_path)
    names = BASE_INPUTS + (["token_type_ids"] if family in TOKEN_TYPE_FAMILIES else [])
    assert printed["inputs"] == [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in names]
    assert printed["outputs"] == [{"name": "sentence_embedding", "dtype": "float32",
                                   "shape": ["batch", artifact.manifest.dim]}]
    assert printed["inputs"] == artifact.manifest.record["inputs"]


class RecordingSession:
    """Wraps an onnxruntime session and keeps every feed it was given."""

    def __init__(self, session):
        self.session = session
        self.feeds: list[dict] = []

    def run(self, output_names, feeds):
        self.feeds.append(feeds)
        return self.session.run(output_names, feeds)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "xlmr"])
def test_encoder_feeds_exactly_the_graphs_inputs(exported, family):
    encoder = create_encoder(exported(family).graph_path, device="cpu")
    recorder = RecordingSession(encoder.session)
    ids = np.array([[2, 7, 9, 3], [2, 8, 3, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    vectors = dataclasses.replace(encoder, session=recorder)(ids, mask)
    assert vectors.shape == (2, exported(family).manifest.dim)
    (feeds,) = recorder.feeds
    with_types = family in TOKEN_TYPE_FAMILIES
    assert list(encoder.input_names) == BASE_INPUTS + (["token_type_ids"] if with_types else [])
    assert sorted(feeds) == sorted(encoder.input_names)
    if with_types:
        assert feeds["token_type_ids"].shape == ids.shape and not feeds["token_type_ids"].any()


# ---------------------------------------------------------------------------------------------
# Any graph, and files that are not graphs


def test_foreign_graph_prints_its_own_names_dtypes_and_dims(tmp_path, capsys):
    graph = foreign_graph(tmp_path / "foreign.onnx")
    code, out, err = run_inspect([graph], capsys)
    assert (code, err) == (0, "")
    assert out == (
        f"graph: {graph} (opset 13)\n"
        "inputs:\n"
        "  tokens  int64  [batch, seq]\n"
        "  flags  bool  [?, 4]\n"
        "outputs:\n"
        "  scaled  float32  [batch, seq]\n"
        "  half  float16  [batch, seq]\n"
        "  inverted  bool  [?, 4]\n"
        "  count  int64  []\n"
    )
    code, out, _ = run_inspect([graph, "--json"], capsys)
    assert code == 0 and json.loads(out) == declared_interface(graph)
    assert json.loads(out)["inputs"][1] == {"name": "flags", "dtype": "bool", "shape": [None, 4]}


NOT_ONNX = {
    "text": b"hello, this is not a graph\n",
    "json": b'{"inputs": ["input_ids"]}',
    "parquet": b"PAR1\x15\x04\x15\x00PAR1",
    "empty file": b"",
    "protobuf with no graph": b"\x08\x07",  # parses as ModelProto(ir_version=7) and nothing else
}


@pytest.mark.parametrize("content", NOT_ONNX.values(), ids=NOT_ONNX.keys())
def test_non_onnx_file_exits_2_with_one_line_on_stderr(tmp_path, capsys, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    code, out, err = run_inspect([path], capsys)
    assert (code, out) == (EXIT_USAGE, ""), f"exit {code}, printed:\n{out}"
    assert len(err.splitlines()) == 1 and err.startswith(f"jobs.inspect: error: {path}: not an ONNX model")


def test_missing_file_exits_2_with_one_line_on_stderr(tmp_path, capsys):
    code, out, err = run_inspect([tmp_path / "nope.onnx"], capsys)
    assert (code, out) == (EXIT_USAGE, "")
    assert err == f"jobs.inspect: error: {tmp_path / 'nope.onnx'}: no such file\n"


@pytest.mark.slow
def test_command_line_exit_status_and_streams(tmp_path):
    """The real `python -m jobs.inspect`: a graph exits 0 on stdout; a non-graph exits 2 with one stderr line."""
    graph = foreign_graph(tmp_path / "foreign.onnx")
    (tmp_path / "notes.txt").write_text("not a graph")

    def run(path):
        return subprocess.run(module_command("jobs.inspect", path, "--json"), cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60, check=False)

    good, bad = run(graph), run(tmp_path / "notes.txt")
    assert (good.returncode, good.stderr) == (0, "")
    assert json.loads(good.stdout) == declared_interface(graph)
    assert (bad.returncode, bad.stdout) == (EXIT_USAGE, "")
    assert len(bad.stderr.splitlines()) == 1 and "not an ONNX model" in bad.stderr
