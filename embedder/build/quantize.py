"""int8 graphs for the CPU that keep quality: every weight MatMul int8, in the recipe that suits the exporting
CPU (embedder.build.int8_graph: smoothed, activation scales per batch or per token, weights of 8 bits or of
7 rounded by GPTQ), the sensitive ones left in fp32 only where the calibration sample asks for it, gated on
another sample.

The search: the fp32 graph runs the calibration texts once with every candidate's input exposed, for each
input's channel ranges (the smoothing factors) and, where the recipe rounds weights by GPTQ, its Gram matrix
X^T X over the real (unpadded) tokens. Everything int8 is tried first, the usual answer (all-MiniLM-L6-v2:
calibration and gate above 0.99 with all 36 MatMuls int8), at each alpha of SMOOTHING_ALPHAS, the best kept.
If that misses the calibration target, each product's own int8 error is computed in numpy from the exposed
inputs (the rewrite's rounding), and the worst go back to fp32, as few as reach it (a bisection over how
many: about log2(MatMuls) quantize-and-run trials, not one per MatMul). The result must then pass the gate
on each domain's report texts, which the search never saw, or the export refuses. Last, the export times
int8 against fp32 on this CPU and records the ratio with the ISA (embedder.build.isa).

Measured with scripts/bench_int8.py, 1,000 docstring rows, every weight MatMul int8: onnxruntime's
quantize_dynamic (one activation scale per batch) ran 1.45-1.63x fp32 on AVX2 (Zen 3) but at min cosine 0.967
on the gate's multilingual mix (it used to keep 22-23 of 36 MatMuls in fp32 for that, and ran at ~1.1x).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from embedder.build.gate import domains, row_cosines
from embedder.build.int8_graph import (
    SMOOTHING_ALPHAS,
    batch_scaled,
    recipe_for,
    rewrite_int8,
    round_trip,
    smoothed_weights,
    smoothing_factors,
)
from embedder.build.isa import FASTER_RATIO, describe
from embedder.errors import ExportError

logger = logging.getLogger(__name__)

MIN_COSINE = 0.99
# The calibration sample must clear the gate with room to spare: other text than it was tuned on is harder.
_CALIBRATION_MARGIN = 0.5  # of the allowed error (1 - MIN_COSINE): 0.995 for a gate of 0.99
_SPEED_ROUNDS = 4
_SENSITIVITY_TOKENS = 256  # token rows per batch whose products the ranking computes
_SPEED_TEXTS = 96

Feeds = Callable[[list[str], int], list[dict]]  # texts, batch size -> the graph's input batches (length-sorted)


def quantize_int8(graph_path: Path, feeds_for: Feeds, min_cosine: float | None = None) -> dict:
    """Replace the fp32 graph at graph_path by a gated int8 graph; return the figures for the manifest."""
    min_cosine = MIN_COSINE if min_cosine is None else min_cosine
    started = time.perf_counter()
    import onnx
    from onnx import numpy_helper

    isa = describe()
    recipe = recipe_for(isa["kind"])
    sample = domains()
    calibration = [t for d in sample for t in d.calibration]
    calib_feeds = feeds_for(calibration, 32)
    run = _Runner()
    reference = run(graph_path, calib_feeds)
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    weights = {t.name: t for t in graph.initializer}
    # Products with a weight matrix: the activation-by-activation ones inside attention (scores, context)
    # would need both sides quantized on the fly, for little speed and more error.
    candidates = [n for n in graph.node if n.op_type == "MatMul" and n.domain == "" and n.input[1] in weights]
    if not candidates:
        raise ExportError("int8: the graph has no MatMul with a weight matrix to quantize; use --precision fp32")
    names = [n.name for n in candidates]
    logger.info("int8: %s recipe for this %s CPU; %d MatMuls, %d calibration texts", recipe.name, isa["kind"],
                len(candidates), len(calibration))
    probe_feeds = feeds_for(calibration, 16)
    input_max, grams = input_statistics(graph_path, [n.input[0] for n in candidates], probe_feeds, recipe.gptq)
    members = {x: [numpy_helper.to_array(weights[n.input[1]]) for n in candidates if n.input[0] == x] for x in input_max}
    per_batch = batch_scaled(members) if recipe.per_batch else set()
    target = 1 - (1 - min_cosine) * _CALIBRATION_MARGIN
    trial = graph_path.with_name("int8-trial.onnx")
    trials: list[dict] = []

    def calibrated(int8_names: list[str], smoothing: dict | None, **record) -> float:
        rewrite_int8(graph_path, trial, int8_names, smoothing, per_batch, recipe.weight_bits, grams)
        worst = float(row_cosines(run(trial, calib_feeds), reference).min())
        trials.append({**record, "calibration_min_cosine": round(worst, 6)})
        logger.info("int8: %s: calibration min cosine %.5f (target %.4f) [%.0f s]",
                    ", ".join(f"{k} {v}" for k, v in record.items()), worst, target, time.perf_counter() - started)
        return worst

    try:
        by_alpha = {a: {x: smoothing_factors(m, members[x], a) for x, m in input_max.items()}
                    for a in SMOOTHING_ALPHAS}
        scores = {a: calibrated(names, s, alpha=a, fp32_nodes=0) for a, s in by_alpha.items()}
        alpha = max(scores, key=scores.__getitem__)
        smoothing, all_int8 = by_alpha[alpha], scores[alpha]
        ranked = names
        if all_int8 >= target:
            count = 0
        else:
            logger.info("int8: ranking the MatMuls by their own int8 error to keep the worst in fp32")
            errors = _sensitivity(graph_path, candidates, weights, probe_feeds, smoothing, per_batch,
                                  recipe.weight_bits, grams)
            # Ranked by error alone: ranked per weight element (keeping the cheap attention products in fp32
            # first) it needed 32 of 36 in fp32 instead of 22 on all-MiniLM-L6-v2, and ran slower.
            ranked = sorted(names, key=errors.__getitem__, reverse=True)
            count = _fewest(lambda n: calibrated(ranked[n:], smoothing, fp32_nodes=n) >= target, len(ranked) - 1)
        if count is None:
            raise ExportError(f"int8 quantization cannot reach min cosine {min_cosine} against fp32 even with one "
                              "MatMul quantized; use --precision fp32")
        excluded, kept = ranked[:count], ranked[count:]
        rewrite_int8(graph_path, trial, kept, smoothing, per_batch, recipe.weight_bits, grams)
        gate = _gate(run, graph_path, trial, sample, feeds_for, min_cosine)
        speed = _speed(graph_path, trial, feeds_for(list(sample[0].gate[:_SPEED_TEXTS]), 32))
        trial.replace(graph_path)
    finally:
        trial.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    logger.info("int8: %d of %d MatMuls quantized; gate min cosine %s; %.2fx fp32 on this %s CPU; %.0f s",
                len(kept), len(ranked), ", ".join(f"{d['min_cosine']:.4f} ({name})" for name, d in gate["domains"].items()),
                speed["ratio"], speed["isa"]["kind"], seconds)
    if speed["ratio"] < FASTER_RATIO:
        logger.warning("int8 ran at only %.2fx fp32 on this %s CPU: fp32 is as fast here", speed["ratio"],
                       speed["isa"]["kind"])
    return {
        "method": recipe.method,
        "recipe": recipe.name,
        "smoothing_alpha": alpha,
        "weight_bits": recipe.weight_bits,
        "weight_rounding": "gptq" if recipe.gptq else "nearest",
        "quantized_nodes": len(kept),
        "fp32_nodes": excluded,
        "search": {"order": "every MatMul int8 first; if that misses the calibration target, the worst by their own "
                            "int8 output error on the calibration texts go back to fp32, as few as reach it",
                   "calibration_texts": {d.name: len(d.calibration) for d in sample},
                   "calibration_target": target, "trials": trials},
        "gate": gate,
        "speed": speed,
        "seconds": round(seconds, 1),
    }


class _Runner:
    """Vectors of a graph for input batches, on the CPU provider; sessions kept per path and file version."""

    def __init__(self):
        self.sessions: dict = {}

    def session(self, path: Path):
        from embedder.infer.devices import DEVICE_KINDS
        from embedder.infer.session import open_session

        key = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
        if key not in self.sessions:
            session, reason = open_session(path, DEVICE_KINDS["cpu"])
            if session is None:
                raise ExportError(f"cannot run {path.name} to gate it: {reason}")
            self.sessions = {k: v for k, v in self.sessions.items() if k[0] != key[0]} | {key: session}
        return self.sessions[key]

    def __call__(self, path: Path, feeds: list[dict]) -> np.ndarray:
        session = self.session(path)
        return np.concatenate([session.run(["sentence_embedding"], f)[0] for f in feeds])


def _fewest(passes: Callable[[int], bool], most: int) -> int | None:
    """The smallest n in 1..most with passes(n), by bisection (about log2(most) trials: 6 for 36 MatMuls),
    passes(0) known False and more fp32 nodes assumed never to hurt; None if passes(most) is False."""
    low, high = 0, most + 1  # passes(high) taken as True (everything fp32)
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high if high <= most else None


def _sensitivity(graph_path: Path, candidates: list, weights: dict, feeds: list[dict], smoothing: dict,
                 per_batch: set[str], weight_bits: int, grams: dict[str, np.ndarray]) -> dict[str, float]:
    """Each MatMul's relative output error with only itself in int8, worst over the batches, from one fp32 run;
    the rounding is the rewrite's (embedder.build.int8_graph)."""
    from onnx import numpy_helper

    quantized = {}
    for node in candidates:
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        c = smoothing.get(node.input[0], np.ones(w.shape[0], np.float32))
        w8, scale = smoothed_weights(w, c, weight_bits, grams.get(node.input[0]))
        quantized[node.name] = (w, w8 * scale, c)
    errors = dict.fromkeys(quantized, 0.0)
    for values in _probe(graph_path, [n.input[0] for n in candidates], feeds):
        for node in candidates:
            x = values[node.input[0]]
            w, wq, c = quantized[node.name]
            xq = round_trip(x * c, per_batch=node.input[0] in per_batch).reshape(-1, x.shape[-1])
            x = x.reshape(-1, x.shape[-1])
            sample = slice(None, None, max(1, len(x) // _SENSITIVITY_TOKENS))  # numpy is slow
            y = x[sample] @ w
            error = float(np.linalg.norm(xq[sample] @ wq - y) / (np.linalg.norm(y) + 1e-30))
            errors[node.name] = max(errors[node.name], error)
    return errors


def input_statistics(graph_path: Path, inputs: list[str], feeds: list[dict],
                     grams: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(max |x| per channel of each of these tensors over the feeds, and where grams is asked for, X^T X of its
    rows: the tokens under the attention mask of a [batch, tokens, hidden] tensor, every row of another).
    The max counts padded tokens too: a batch's activation scale does."""
    highest: dict[str, np.ndarray] = {}
    gram: dict[str, np.ndarray] = {}
    for feed, values in zip(feeds, _probe(graph_path, inputs, feeds)):
        real = feed["attention_mask"].astype(bool)
        for name, value in values.items():
            high = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            highest[name] = np.maximum(highest[name], high) if name in highest else high
            if grams:
                tokens = value.ndim == 3 and value.shape[:2] == real.shape
                rows = value[real] if tokens else value.reshape(-1, value.shape[-1])
                gram[name] = gram[name] + rows.T @ rows if name in gram else rows.T @ rows
    return highest, gram


def _probe(graph_path: Path, inputs: list[str], feeds: list[dict]) -> Iterator[dict[str, np.ndarray]]:
    """Per feed, the values of these inner tensors of the fp32 graph (a copy of it that outputs them)."""
    import onnx

    model = onnx.load(str(graph_path))
    inputs = list(dict.fromkeys(inputs))
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs)
    probe = graph_path.with_name("int8-probe.onnx")
    onnx.save(model, str(probe))
    try:
        session = _Runner().session(probe)
        for feed in feeds:
            yield dict(zip(inputs, session.run(inputs, feed)))
    finally:
        probe.unlink(missing_ok=True)


def _gate(run: _Runner, fp32: Path, int8: Path, sample, feeds_for: Feeds, min_cosine: float) -> dict:
    """Min and mean cosine against fp32 on each domain's gate texts (none of them calibrated on); refuse below min_cosine."""
    figures = {}
    for domain in sample:
        feeds = feeds_for(list(domain.gate), 32)
        cosines = row_cosines(run(int8, feeds), run(fp32, feeds))
        figures[domain.name] = {"texts": len(domain.gate), "min_cosine": float(cosines.min()),
                                "mean_cosine": float(cosines.mean())}
    failed = {name: d["min_cosine"] for name, d in figures.items() if d["min_cosine"] < min_cosine}
    if failed:
        raise ExportError("int8 graph fails its gate against fp32 on text it was not calibrated on: "
                          + ", ".join(f"{name} min cosine {v:.5f}" for name, v in failed.items())
                          + f" (limit {min_cosine}); use --precision fp32")
    return {"threshold": min_cosine, "against": "the fp32 graph", "disjoint_from_calibration": True,
            "texts": sum(d["texts"] for d in figures.values()),
            "min_cosine": min(d["min_cosine"] for d in figures.values()),
            "domains": figures}


def _speed(fp32: Path, int8: Path, feeds: list[dict]) -> dict:
    """int8 against fp32 tokens/s on this CPU: one warm-up pass each, then rounds alternating which runs first."""
    runner = _Runner()
    tokens = int(sum(int(f["attention_mask"].sum()) for f in feeds))
    graphs = {"fp32": fp32, "int8": int8}
    for path in graphs.values():
        runner(path, feeds[:2])
    rates: dict[str, list[float]] = {name: [] for name in graphs}
    for round_ in range(_SPEED_ROUNDS):
        for name in (list(graphs) if round_ % 2 == 0 else list(graphs)[::-1]):
            began = time.perf_counter()
            runner(graphs[name], feeds)
            rates[name].append(tokens / (time.perf_counter() - began))
    ratios = [i / f for i, f in zip(rates["int8"], rates["fp32"])]
    return {"isa": describe(), "tokens": tokens, "rounds": _SPEED_ROUNDS,
            "fp32_tokens_per_second": round(float(np.median(rates["fp32"])), 1),
            "int8_tokens_per_second": round(float(np.median(rates["int8"])), 1),
            "ratio": round(float(np.median(ratios)), 3),
            "threads": "onnxruntime's default (every core)"}
