"""Rounding a weight matrix to int8 so that its products, not its entries, stay close: GPTQ (Frantar et al.,
2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Rounding each weight to its nearest grid point ignores how the inputs use it. GPTQ rounds one input row of
the weights at a time and spreads that row's rounding error over the rows not yet rounded, in the proportions
that cancel it best on the calibration inputs (their Gram matrix X^T X, through the Cholesky factor of its
inverse). The grid is the same as plain rounding's: symmetric, one scale per output column, so onnxruntime's
MatMulIntegerToFloat runs it unchanged. With the identity as Gram matrix it is plain rounding.

Why here: AVX2's int8 products saturate unless the weights have 7 bits (embedder.build.int8_graph), and the
bit lost costs quality that GPTQ wins back: all-MiniLM-L6-v2 smoothed at alpha 0.6, a scale per token, 7-bit
weights, gate min cosine on AVX2 0.9948 / 0.9938 / 0.9876 rounded to nearest (the multilingual mix below the
0.99 limit), 0.9974 / 0.9965 / 0.9916 rounded by GPTQ (scripts/bench_int8.py --variants
smooth-7bit,smooth-7bit-nearest under scripts/as_cpu.py avx2). Its cost: about 2 s for the 36 matrices.
"""

from __future__ import annotations

import numpy as np

_DAMPING = 0.01  # of the Gram matrix's mean diagonal, added to it: the paper's default, keeps it invertible
_BLOCK = 128  # rows whose error updates the rest at once (the paper's lazy batch update; same result)


def gptq_round(w: np.ndarray, scale: np.ndarray, gram: np.ndarray, levels: int) -> np.ndarray:
    """The int8 values in -levels..levels of a [in, out] weight matrix on the grid of scale (one per output
    column), rounded against gram ([in, in], X^T X of the inputs it multiplies)."""
    weights = w.astype(np.float64)
    scale = scale.astype(np.float64)
    gram = gram.astype(np.float64)  # a copy: the caller's stays as it was
    unused = np.diag(gram) == 0  # an input channel that was always 0: its weights never count
    gram[unused, unused] = 1
    weights[unused] = 0
    # Largest inputs first (the paper's act-order): their errors then have the most rows left to go into.
    order = np.argsort(-np.diag(gram), kind="stable")
    weights, gram = weights[order], gram[np.ix_(order, order)]
    gram[np.diag_indices_from(gram)] += _DAMPING * np.mean(np.diag(gram))
    inverse = np.linalg.cholesky(np.linalg.inv(gram)).T  # upper: inv(gram) = inverse.T @ inverse
    rounded = np.empty_like(weights)
    for start in range(0, len(weights), _BLOCK):
        stop = min(start + _BLOCK, len(weights))
        block, errors, inner = weights[start:stop], np.empty((stop - start, weights.shape[1])), inverse[start:stop, start:stop]
        for i in range(stop - start):
            rounded[start + i] = np.clip(np.round(block[i] / scale), -levels, levels)
            errors[i] = (block[i] - rounded[start + i] * scale) / inner[i, i]
            block[i:] -= np.outer(inner[i, i:], errors[i])
        weights[stop:] -= inverse[start:stop, stop:].T @ errors
    values = np.empty_like(rounded)
    values[order] = rounded
    return values.astype(np.int8)
