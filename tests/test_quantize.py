"""--precision int8: a gated int8 graph for the CPU (tiny BERT; the gate's figures in the manifest)."""

from __future__ import annotations

import numpy as np
import pytest
from models import TEXTS, cosines, one_matmul, onnx_vectors, run_graph

from embedder import ExportOptions, get_or_export, load_spec
from embedder.build import isa, quantize
from embedder.build.gate import domains
from embedder.build.int8_graph import (
    SMOOTHED,
    SMOOTHED_7BIT,
    SMOOTHING_ALPHAS,
    batch_scaled,
    quantize_weights,
    recipe_for,
    rewrite_int8,
    round_trip,
    smoothing_factors,
)
from embedder.build.isa import isa_kind, note_int8_host
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
    quantization = manifest.record["quantization"]
    gate = quantization["gate"]
    assert gate["min_cosine"] >= gate["threshold"] == 0.99 and gate["texts"] >= 32
    assert set(gate["domains"]) == {"docstrings", "short sentences", "multilingual and emoji"}
    assert all(d["min_cosine"] >= 0.99 and d["texts"] >= 32 for d in gate["domains"].values()), gate
    assert quantization["quantized_nodes"] > 0 and quantization["search"]["trials"]
    # The export timed int8 against fp32 here and says on which kind of CPU.
    speed = quantization["speed"]
    assert speed["isa"]["kind"] == isa_kind() and speed["ratio"] > 0 and speed["tokens"] > 0
    # Same interface as the fp32 graph, so the job feeds it the same way.
    assert read_graph_info(int8_artifact.graph_path).inputs == read_graph_info(fp32.graph_path).inputs
    nodes = __import__("onnx").load(str(int8_artifact.graph_path)).graph.node
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in nodes) == quantization["quantized_nodes"]
    assert quantization["method"] == recipe_for(isa_kind()).method
    assert quantization["recipe"] == recipe_for(isa_kind()).name


@pytest.mark.parametrize("recipe", [SMOOTHED, SMOOTHED_7BIT], ids=lambda r: r.name)
def test_each_recipe_passes_its_gate_whatever_cpu_exports(recipe, model_zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "recipe_for", lambda kind: recipe)
    artifact = get_or_export(load_spec(model_zoo.model_arg("bert")), ExportOptions(precision="int8"), tmp_path)
    quantization = artifact.manifest.record["quantization"]
    assert quantization["recipe"] == recipe.name and quantization["gate"]["min_cosine"] >= 0.99
    nodes = __import__("onnx").load(str(artifact.graph_path)).graph.node
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in nodes) == quantization["quantized_nodes"] > 0
    # Every alpha tried on calibration, the best kept; every quantized input smoothed.
    alphas = [t["alpha"] for t in quantization["search"]["trials"] if "alpha" in t]
    assert alphas == list(SMOOTHING_ALPHAS) and quantization["smoothing_alpha"] in alphas
    assert sum(n.op_type == "Mul" and n.output[0].endswith("_smoothed") for n in nodes) > 0
    ops = [n.op_type for n in nodes]
    assert quantization["weight_bits"] == recipe.weight_bits
    if recipe.per_batch:  # one scale per batch, but a scale per token where the FFN comes back down
        assert ops.count("DynamicQuantizeLinear") > 0 and ops.count("QuantizeLinear") > 0
    else:  # a scale per token everywhere, weights in -63..63: AVX2's int16 pair sums cannot saturate
        assert ops.count("DynamicQuantizeLinear") == 0 and ops.count("QuantizeLinear") > 0
        from onnx import numpy_helper
        int8 = [numpy_helper.to_array(t) for t in __import__("onnx").load(str(artifact.graph_path)).graph.initializer
                if t.data_type == 3]  # INT8
        assert int8 and 56 <= max(int(np.abs(w.astype(np.int32)).max()) for w in int8) <= 63
    got, want = onnx_vectors(artifact, TEXTS), onnx_vectors(exported_fp32(model_zoo, tmp_path), TEXTS)
    assert cosines(got, want).min() >= 0.99


@pytest.mark.parametrize("family", ["roberta", "distilbert", "xlmr", "bert_weightedmean"])
def test_the_7bit_recipe_exports_every_family(family, model_zoo, tmp_path, monkeypatch):
    # Other attention sinks (<s>), other graphs, and Dense layers after pooling, whose inputs are one row per text.
    monkeypatch.setattr(quantize, "recipe_for", lambda kind: SMOOTHED_7BIT)
    spec = load_spec(model_zoo.model_arg(family))
    artifact = get_or_export(spec, ExportOptions(precision="int8"), tmp_path)
    quantization = artifact.manifest.record["quantization"]
    assert quantization["recipe"] == SMOOTHED_7BIT.name and quantization["weight_rounding"] == "gptq"
    assert quantization["gate"]["min_cosine"] >= 0.99 and quantization["quantized_nodes"] > 0
    got = onnx_vectors(artifact, TEXTS)
    want = onnx_vectors(get_or_export(spec, ExportOptions(), tmp_path), TEXTS)
    assert cosines(got, want).min() >= 0.99


def exported_fp32(model_zoo, tmp_path):
    return get_or_export(load_spec(model_zoo.model_arg("bert")), ExportOptions(), tmp_path)


def test_the_recipe_follows_the_cpu_kind_and_so_does_the_cache_key(model_zoo, monkeypatch):
    # VNNI adds u8 x s8 products in int32; AVX2 (and AVX-512 without VNNI) in saturating int16 pairs.
    assert recipe_for("avx512-vnni") is recipe_for("avx-vnni") is SMOOTHED
    assert recipe_for("avx2") is recipe_for("avx512") is recipe_for("other") is SMOOTHED_7BIT
    from embedder.build import cache

    spec, keys = load_spec(model_zoo.model_arg("bert")), {}
    for kind in ("avx512-vnni", "avx-vnni", "avx2", "avx512"):
        monkeypatch.setattr(cache, "isa_kind", lambda kind=kind: kind)
        keys[kind] = (cache.model_key(spec, ExportOptions(precision="int8"), "content"),
                      cache.model_key(spec, ExportOptions(), "content"))
    assert keys["avx512-vnni"][0] == keys["avx-vnni"][0] != keys["avx2"][0] == keys["avx512"][0]
    assert len({fp32 for _, fp32 in keys.values()}) == 1  # fp32 entries are for every CPU


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


def test_gate_reports_on_other_rows_than_it_calibrates_on():
    sample = domains()
    assert [d.name for d in sample] == ["docstrings", "short sentences", "multilingual and emoji"]
    for domain in sample:
        assert len(domain.calibration) >= 32 and len(domain.gate) >= 32, domain.name
        assert not set(domain.calibration) & set(domain.gate), domain.name
        # Nor one that differs only in what a tokenizer drops (whitespace, control and zero-width characters).
        words = lambda texts: {"".join(c for c in t if c.isalnum()) for t in texts}  # noqa: E731
        assert not words(domain.calibration) & words(domain.gate), domain.name
    # The domains are what they say: short rows are short, the mix has scripts other than Latin, and emoji.
    assert max(len(t.split()) for t in sample[1].gate) <= 20 < max(len(t.split()) for t in sample[0].gate)
    mix = "".join(sample[2].gate)
    assert any("\u4e00" <= c <= "\u9fff" for c in mix) and any(ord(c) >= 0x1F300 for c in mix)


@pytest.mark.parametrize("first_passing", [1, 2, 5, 17, 35])
def test_search_finds_the_fewest_fp32_nodes_in_few_trials(first_passing):
    tried = []

    def passes(n):
        tried.append(n)
        return n >= first_passing

    assert quantize._fewest(passes, 35) == first_passing
    assert 0 not in tried  # everything int8 was tried before the search
    assert len(tried) <= 6 and len(set(tried)) == len(tried)  # log2(36) rounded up: bisection, not a scan


def test_search_gives_up_when_even_one_quantized_node_fails():
    assert quantize._fewest(lambda n: False, 35) is None


def test_job_logs_an_int8_graph_timed_on_another_cpu_kind_or_no_faster(monkeypatch, caplog):
    record = {"speed": {"isa": {"kind": "avx512-vnni"}, "ratio": 1.9}}
    monkeypatch.setattr(isa, "isa_kind", lambda flags=None: "avx2")
    with caplog.at_level("WARNING", logger="embedder.build.isa"):
        note_int8_host(record)
        assert "tuned and timed on a avx512-vnni CPU, running on a avx2 one" in caplog.text
        caplog.clear()
        note_int8_host({"speed": {"isa": {"kind": "avx2"}, "ratio": 1.04}})
        assert "fp32 is as fast here" in caplog.text
        caplog.clear()
        note_int8_host({"speed": {"isa": {"kind": "avx2"}, "ratio": 1.4}})
        note_int8_host(None)  # fp32 entries and int8 ones exported before the speed was recorded
        assert not caplog.text


def test_job_says_when_the_int8_speed_was_timed_with_amx_and_this_cpu_has_none(monkeypatch, caplog):
    record = {"speed": {"isa": {"kind": "avx512-vnni", "flags": ["avx2", "avx512_vnni", "amx_int8"]}, "ratio": 2.4}}
    monkeypatch.setattr(isa, "isa_kind", lambda flags=None: "avx512-vnni")
    monkeypatch.setattr(isa, "cpu_flags", lambda: ("avx2", "avx512f", "avx512_vnni"))
    with caplog.at_level("INFO", logger="embedder.build.isa"):
        note_int8_host(record)
        assert "2.40x fp32 on a avx512-vnni CPU with AMX, running on one without" in caplog.text
        assert "expect a lower ratio" in caplog.text
        caplog.clear()
        monkeypatch.setattr(isa, "cpu_flags", lambda: ("avx2", "avx512f", "avx512_vnni", "amx_int8"))
        note_int8_host(record)  # the same kind of CPU it was timed on: nothing to say
        assert not caplog.text


# The rewrite itself, on one MatMul: onnxruntime's int8 kernels against the rounding it documents


@pytest.fixture
def weights():
    """Weights whose odd input rows are tiny. AVX2 without VNNI adds u8 x s8 products in pairs of adjacent inputs
    in int16 (vpmaddubsw), which saturates where both are large; 255 x (127 + 1) cannot, so onnxruntime's result
    is the rounding's own on every CPU. (The gate measures the saturation's cost on real models.)"""
    w = np.random.default_rng(3).normal(0, 0.05, (64, 48)).astype(np.float32)
    w[1::2] *= 0.003
    return w


def test_rewrite_gives_each_token_its_scale(tmp_path, weights):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (3, 7, 64)).astype(np.float32)
    x[:, 0, 5] = 60.0  # the attention sink's massive channel
    x[1, 3] *= 40  # a loud token does not coarsen its neighbours
    x[2, 6] = 0.0  # an all-zero (padding-like) token
    src, dst = one_matmul(tmp_path, weights, 3), tmp_path / "int8.onnx"
    rewrite_int8(src, dst, ["proj"])
    got = run_graph(dst, x)
    w8, scale = quantize_weights(weights)
    np.testing.assert_allclose(got, round_trip(x) @ (w8 * scale), rtol=1e-4, atol=1e-4)
    assert np.array_equal(got[2, 6], np.zeros(48, np.float32))
    # Each token on its own grid: the quiet tokens' error is far below what one scale per batch gives them.
    exact = x @ weights
    batch_grid = np.round(x / (np.abs(x).max() / 127)) * (np.abs(x).max() / 127)
    quiet = np.ones((3, 7), bool)
    quiet[:, 0], quiet[1, 3] = False, False
    assert np.abs(got - exact)[quiet].max() * 5 < np.abs(batch_grid @ (w8 * scale) - exact)[quiet].max()
    ops = [n.op_type for n in __import__("onnx").load(str(dst)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 1 and "MatMul" not in ops


def test_rewrite_runs_one_token_texts_and_rows_without_tokens(tmp_path, weights):
    x = np.random.default_rng(5).normal(0, 1, (4, 1, 64)).astype(np.float32)
    dst = tmp_path / "int8.onnx"
    rewrite_int8(one_matmul(tmp_path, weights, 3), dst, ["proj"])
    w8, scale = quantize_weights(weights)
    np.testing.assert_allclose(run_graph(dst, x), round_trip(x) @ (w8 * scale), rtol=1e-4, atol=1e-5)

    # A 2-D input (a Dense layer after pooling: one row per text) is rounded per row.
    rows = x[:, 0]
    rewrite_int8(one_matmul(tmp_path, weights, 2), dst, ["proj"])
    np.testing.assert_allclose(run_graph(dst, rows), round_trip(rows) @ (w8 * scale), rtol=1e-4, atol=1e-5)


def test_smoothing_moves_an_outlier_channel_into_the_weights(tmp_path, weights):
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (3, 7, 64)).astype(np.float32)
    x[:, :, 4] *= 30  # one channel loud in every token: each token's scale is its, the rest round coarsely
    weights = weights.copy()
    weights[1::2] = 0  # smoothing scales rows up: with the odd ones zero, AVX2's pair sums still cannot saturate
    src, plain, smoothed = one_matmul(tmp_path, weights, 3), tmp_path / "plain.onnx", tmp_path / "smoothed.onnx"
    c = smoothing_factors(np.abs(x).max(axis=(0, 1)), [weights], alpha=0.5)
    assert c.max() == 1 and c[4] == c[::2].min()  # the loud channel is scaled down the most
    rewrite_int8(src, plain, ["proj"])
    rewrite_int8(src, smoothed, ["proj"], smoothing={"x": c})
    got = run_graph(smoothed, x)
    # The rounding it documents: x * c on each token's grid, against the weights' rows divided by c.
    w8, scale = quantize_weights(weights / c[:, None])
    np.testing.assert_allclose(got, round_trip(x * c) @ (w8 * scale), rtol=1e-4, atol=1e-4)
    exact = x @ weights
    error = {name: np.linalg.norm(run_graph(path, x) - exact) for name, path in (("plain", plain), ("smoothed", smoothed))}
    assert error["smoothed"] * 2 < error["plain"], error
    ops = [n.op_type for n in __import__("onnx").load(str(smoothed)).graph.node]
    assert "MatMul" not in ops and ops.count("MatMulIntegerToFloat") == 1  # every token int8


def test_batch_scales_round_on_the_batch_grid_and_take_the_bias_in(tmp_path, weights):
    rng = np.random.default_rng(7)
    x = rng.normal(0.3, 1, (3, 7, 64)).astype(np.float32)
    bias = rng.normal(0, 1, 48).astype(np.float32)
    c = smoothing_factors(np.abs(x).max(axis=(0, 1)), [weights], alpha=0.5)
    dst = tmp_path / "batch.onnx"
    rewrite_int8(one_matmul(tmp_path, weights, 3, bias), dst, ["proj"], smoothing={"x": c}, per_batch={"x"})
    w8, scale = quantize_weights(weights / c[:, None])
    want = round_trip(x * c, per_batch=True) @ (w8 * scale) + bias
    np.testing.assert_allclose(run_graph(dst, x), want, rtol=1e-4, atol=1e-4)
    # One grid for the batch: a token 40x louder coarsens every other token's rounding.
    loud = x.copy()
    loud[1, 3] *= 40
    quiet = np.ones((3, 7), bool)
    quiet[1, 3] = False
    error = {name: np.abs(run_graph(dst, v) - (v @ weights + bias))[quiet].max() for name, v in (("x", x), ("loud", loud))}
    assert error["loud"] > 5 * error["x"], error
    ops = [n.op_type for n in __import__("onnx").load(str(dst)).graph.node]
    assert ops == ["Mul", "DynamicQuantizeLinear", "MatMulIntegerToFloat"]  # the bias Add is in the product


def test_down_projections_keep_a_scale_per_token():
    # all-MiniLM-L6-v2's shapes: query/key/value share one input, the FFN widens 384 -> 1536 and comes back.
    inputs = {"ln1": [np.zeros((384, 384))] * 3, "context": [np.zeros((384, 384))], "ln2": [np.zeros((384, 1536))],
              "gelu": [np.zeros((1536, 384))]}
    assert batch_scaled(inputs) == {"ln1", "context", "ln2"}
