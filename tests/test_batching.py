"""embedder.infer.batching: token-budget batch plans (properties, via hypothesis) and right-padded batches."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from embedder.infer.batching import pad_batch, plan_batches
from embedder.infer.tokenize import TextTokenizer
from embedder.model.spec import default_model_path

lengths_strategy = st.lists(st.integers(0, 600), max_size=300).map(lambda v: np.array(v, dtype=np.int64))
token_rows = st.lists(st.lists(st.integers(0, 30_000), max_size=24), min_size=1, max_size=40)


def flatten(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token rows as the tokenizer lays them out: ids back to back, and offsets."""
    ids = np.array([t for row in rows for t in row], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
    return ids, offsets


@given(lengths=lengths_strategy, max_tokens=st.integers(1, 4096), max_batch_size=st.integers(1, 128))
def test_plan_covers_every_row_exactly_once(lengths, max_tokens, max_batch_size):
    batches = plan_batches(lengths, max_tokens, max_batch_size)
    assert all(len(b) >= 1 for b in batches)
    covered = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(covered.tolist()) == list(range(len(lengths)))


@given(lengths=lengths_strategy, max_tokens=st.integers(1, 4096), max_batch_size=st.integers(1, 128))
def test_plan_respects_the_token_budget_and_batch_size(lengths, max_tokens, max_batch_size):
    for batch in plan_batches(lengths, max_tokens, max_batch_size):
        assert len(batch) <= max_batch_size
        if len(batch) > 1:  # a single row longer than the budget still gets a batch of its own
            assert len(batch) * int(lengths[batch].max()) <= max_tokens


@given(lengths=lengths_strategy, max_tokens=st.integers(1, 4096), max_batch_size=st.integers(1, 128))
def test_plan_is_longest_first_and_fills_each_batch(lengths, max_tokens, max_batch_size):
    """Sorted by length (low padding, largest batch first), and no batch stops short of a limit."""
    batches = plan_batches(lengths, max_tokens, max_batch_size)
    for earlier, later in zip(batches, batches[1:]):
        assert lengths[later].max() <= lengths[earlier].min()
        grown = len(earlier) + 1
        assert grown > max_batch_size or grown * max(int(lengths[earlier].max()), 1) > max_tokens


def test_plan_of_no_rows_is_empty():
    assert plan_batches(np.array([], dtype=np.int64), 100, 8) == []


def test_plan_gives_an_over_budget_row_its_own_batch():
    batches = plan_batches(np.array([5, 500, 5, 5]), max_tokens=100, max_batch_size=8)
    assert [b.tolist() for b in batches] == [[1], [0, 2, 3]]


@given(rows=token_rows, data=st.data())
def test_pad_batch_right_pads_the_chosen_rows(rows, data):
    ids, offsets = flatten(rows)
    chosen = np.array(data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=1, unique=True)), dtype=np.int64)
    pad_id = data.draw(st.integers(0, 3))
    batch = pad_batch(ids, offsets, chosen, pad_id)
    width = max(len(rows[i]) for i in chosen)
    assert batch.input_ids.shape == batch.attention_mask.shape == (len(chosen), width)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == np.int64
    np.testing.assert_array_equal(batch.rows, chosen)
    for position, row in enumerate(chosen):
        tokens = rows[row]
        assert batch.input_ids[position].tolist() == tokens + [pad_id] * (width - len(tokens))
        assert batch.attention_mask[position].tolist() == [1] * len(tokens) + [0] * (width - len(tokens))
    assert batch.real_tokens == sum(len(rows[i]) for i in chosen)
    assert batch.padded_tokens == len(chosen) * width


def test_planned_and_padded_batches_match_the_tokenized_rows():
    """The real path: a tokenized window, planned, padded; every batch row is that text's tokens."""
    texts = ["short", "", "a somewhat longer sentence about batching", "x " * 300, "mid length text here"]
    tokenizer = TextTokenizer(default_model_path() / "tokenizer.json", 256)
    window = tokenizer.encode(texts)
    seen = []
    for rows in plan_batches(window.lengths, max_tokens=300, max_batch_size=3):
        batch = pad_batch(window.ids, window.offsets, rows, pad_id=0)
        for position, row in enumerate(batch.rows):
            want = tokenizer.encode([texts[row]]).ids.tolist()
            length = int(batch.attention_mask[position].sum())
            assert batch.input_ids[position, :length].tolist() == want
            assert not batch.input_ids[position, length:].any()
            seen.append(int(row))
    assert sorted(seen) == list(range(len(texts)))


def test_prefetch_makes_the_next_item_only_once_the_previous_is_taken():
    """Two windows at most: the one the caller embeds and the next, made while it does."""
    import time

    from embedder.run.loop import prefetch

    made = []

    def items():
        for index in range(6):
            made.append(index)
            yield index

    taken = []
    for item in prefetch(items()):
        taken.append(item)
        time.sleep(0.05)  # the producer has time to run ahead, if it would
        assert made[-1] <= item + 1, (made, item)
    assert taken == list(range(6))
