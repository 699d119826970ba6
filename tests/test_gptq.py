"""GPTQ's weight rounding (embedder.build.gptq): the same grid as rounding to nearest, a smaller product error."""

from __future__ import annotations

import numpy as np
import pytest
from models import one_matmul, run_graph

from embedder.build.int8_graph import quantize_weights, rewrite_int8, round_trip


def correlated_inputs(rows: int, channels: int, seed: int) -> np.ndarray:
    """Inputs whose channels move together and differ in size, as a layer's activations do."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(0, 1, (channels, channels)) * rng.uniform(0.1, 3, channels)
    return (rng.normal(0, 1, (rows, channels)) @ mixing).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 7])
def test_identity_gram_is_rounding_to_nearest(bits):
    w = np.random.default_rng(1).normal(0, 0.05, (96, 40)).astype(np.float32)
    got, got_scale = quantize_weights(w, bits, np.eye(96))
    want, want_scale = quantize_weights(w, bits)
    # With uncorrelated unit inputs no row's error can be cancelled by another's (the damping only scales).
    assert np.array_equal(got, want)
    np.testing.assert_allclose(got_scale, want_scale, rtol=1e-6)


@pytest.mark.parametrize("bits", [8, 7])
def test_gptq_cancels_rounding_error_on_the_inputs_it_was_given(bits):
    x = correlated_inputs(2000, 96, seed=2)
    w = np.random.default_rng(3).normal(0, 0.05, (96, 40)).astype(np.float32)
    levels = 2 ** (bits - 1) - 1
    gptq, scale = quantize_weights(w, bits, x.T @ x)
    nearest, nearest_scale = quantize_weights(w, bits)
    # The same grid (one scale per column, symmetric, within the levels), so onnxruntime runs it unchanged.
    np.testing.assert_allclose(scale, nearest_scale, rtol=1e-6)
    assert gptq.dtype == np.int8 and np.abs(gptq.astype(int)).max() <= levels
    assert not np.array_equal(gptq, nearest)

    def error(q):
        return np.linalg.norm(x @ (q * scale) - x @ w)

    assert error(gptq) * 1.5 < error(nearest), (error(gptq), error(nearest))
    # Held-out inputs of the same kind gain too: it fits the inputs' correlations, not these rows.
    held_out = correlated_inputs(500, 96, seed=2)[::-1] * np.float32(1.5)
    assert np.linalg.norm(held_out @ (gptq * scale - w)) < np.linalg.norm(held_out @ (nearest * scale - w))


def test_a_channel_that_is_always_zero_gets_zero_weights():
    x = correlated_inputs(500, 32, seed=4)
    x[:, 7] = 0
    w = np.random.default_rng(5).normal(0, 0.05, (32, 16)).astype(np.float32)
    values, scale = quantize_weights(w, 7, x.T @ x)
    assert np.isfinite(scale).all() and not values[7].any()


def test_rewrite_rounds_each_weight_by_gptq_against_its_smoothed_input(tmp_path):
    x = correlated_inputs(3 * 9, 64, seed=6).reshape(3, 9, 64)
    w = np.random.default_rng(7).normal(0, 0.05, (64, 48)).astype(np.float32)
    c = np.random.default_rng(8).uniform(0.3, 1, 64).astype(np.float32)
    rows = x.reshape(-1, 64).astype(np.float64)
    dst = tmp_path / "gptq.onnx"
    rewrite_int8(one_matmul(tmp_path, w, 3), dst, ["proj"], smoothing={"x": c}, weight_bits=7,
                 grams={"x": rows.T @ rows})
    # The rewrite's weights are GPTQ's on the smoothed problem: (x c) (W / c), Gram c X^T X c.
    w7, scale = quantize_weights(w / c[:, None], 7, (rows * c).T @ (rows * c))
    assert np.abs(w7.astype(int)).max() <= 63
    np.testing.assert_allclose(run_graph(dst, x), round_trip(x * c) @ (w7 * scale), rtol=1e-4, atol=1e-4)


def test_fewer_rows_than_channels_still_round_well():
    # A Dense layer after pooling sees one row per calibration text: its Gram matrix can be rank-deficient.
    x = correlated_inputs(20, 96, seed=9)
    w = np.random.default_rng(10).normal(0, 0.05, (96, 40)).astype(np.float32)
    gptq, scale = quantize_weights(w, 7, x.T @ x)
    nearest, _ = quantize_weights(w, 7)
    assert np.isfinite(scale).all() and np.abs(gptq.astype(int)).max() <= 63
    assert np.linalg.norm(x @ (gptq * scale - w)) < np.linalg.norm(x @ (nearest * scale - w))
