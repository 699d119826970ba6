"""Window -> sort by length -> token-budget batches -> padded arrays; vectors go back by index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    """Rows of one inference call: their positions in the window and their padded tensors."""

    rows: np.ndarray  # positions in the window, for scattering vectors back
    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)


def plan_batches(lengths: np.ndarray, max_tokens: int, max_batch_size: int) -> list[np.ndarray]:
    """Group row positions, longest first, so rows x longest row stays within max_tokens.

    A row longer than max_tokens still gets a batch of its own. Sorting by length keeps padding low;
    longest first means a budget too big for the device fails on the first batch, not the last.
    """
    order = np.argsort(-lengths, kind="stable")
    batches = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_batch_size, max_tokens // longest, len(order) - start))
        batches.append(order[start : start + size])
        start += size
    return batches


def pad_batch(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad_id: int) -> Batch:
    """Right-padded input_ids and attention_mask for the given rows of a tokenized window."""
    starts, ends = offsets[rows], offsets[rows + 1]
    lengths = ends - starts
    width = int(lengths.max())
    positions = np.arange(width)
    mask = positions[None, :] < lengths[:, None]
    # Gather every row's tokens in one vectorised step: index = row start + position (masked).
    gather = np.where(mask, starts[:, None] + positions[None, :], 0)
    input_ids = np.where(mask, ids[gather] if ids.size else pad_id, pad_id).astype(np.int64, copy=False)
    return Batch(rows, input_ids, mask.astype(np.int64))
