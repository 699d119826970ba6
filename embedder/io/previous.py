"""An earlier output of this job (--reuse PREV): how its vectors were made, and the vectors of the texts it holds.

The index keeps PREV's text keys only, sorted: 24 bytes a row (the key's two halves and the row's place), so 10
million rows take about 240 MB however wide their vectors are. A window's keys are looked up with a binary
search; the vectors found are read from PREV's row groups, one row group's `embedding` column at a time, the
last one kept: a nightly corpus keeps its order, so the next window asks for the next rows.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import InputError, first_line
from embedder.io.parquet import resolve_inputs
from embedder.schema import EMBEDDING_COLUMN, METADATA_KEY, TEXT_KEY_COLUMN

logger = logging.getLogger(__name__)


class PreviousOutput:
    """PREV: a file, a folder of parts or a glob, local or in a bucket."""

    def __init__(self, spec: str):
        self.spec = spec
        self.store, entries = resolve_inputs(spec)
        self.files = [e.path for e in entries]
        self.versions = {self.store.uri(e.path): e.version for e in entries}
        self._groups: list[tuple[str, int, int]] = []  # (file, row group, first row) in PREV's order
        rows = 0
        schema = None
        for path in self.files:
            try:
                with self.store.open_input(path) as source:
                    footer = pq.ParquetFile(source)
                    schema = schema or footer.schema_arrow
                    for group in range(footer.metadata.num_row_groups):
                        self._groups.append((path, group, rows))
                        rows += footer.metadata.row_group(group).num_rows
            except (pa.ArrowInvalid, OSError) as e:
                raise InputError(f"--reuse {spec}: cannot read {self.store.uri(path)}: {first_line(e)}") from e
        self.rows = rows
        self.schema = schema
        raw = (schema.metadata or {}).get(METADATA_KEY)
        self.metadata: dict | None = json.loads(raw) if raw else None
        self.has_keys = TEXT_KEY_COLUMN in schema.names and EMBEDDING_COLUMN in schema.names
        self._starts = np.array([first for _, _, first in self._groups] + [rows], dtype=np.int64)
        self._sorted: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._cached: tuple[int, np.ndarray] | None = None  # (row group, its vectors)

    def _read(self, index: int, column: str) -> pa.Array:
        path, group, _ = self._groups[index]
        try:
            with self.store.open_input(path) as source:
                return pq.ParquetFile(source).read_row_group(group, columns=[column]).column(0).combine_chunks()
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"--reuse {self.spec}: cannot read {self.store.uri(path)}: {first_line(e)}") from e

    def columns(self, names: list[str]) -> pa.Table:
        """These columns of every row of PREV, in order."""
        parts = []
        for path in self.files:
            with self.store.open_input(path) as source:
                parts.append(pq.read_table(source, columns=names))
        return pa.concat_tables(parts)

    def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """PREV's keys as (high half, low half, row), sorted; rows without a key (null text) left out."""
        if self._sorted is None:
            highs, lows, places = [], [], []
            for index in range(len(self._groups)):
                keys = self._read(index, TEXT_KEY_COLUMN)
                halves, valid = key_halves(keys)
                rows = np.flatnonzero(valid) + self._starts[index]
                highs.append(halves[valid, 0])
                lows.append(halves[valid, 1])
                places.append(rows)
            high = np.concatenate(highs) if highs else np.zeros(0, np.uint64)
            low = np.concatenate(lows) if lows else np.zeros(0, np.uint64)
            place = np.concatenate(places) if places else np.zeros(0, np.int64)
            order = np.lexsort((low, high))
            self._sorted = (high[order], low[order], place[order])
            logger.info("--reuse: %d keyed rows of %s indexed", len(order), self.spec)
        return self._sorted

    def find(self, keys: np.ndarray) -> np.ndarray:
        """PREV's row holding each key ((n, 16) uint8), or -1."""
        high, low, place = self._index()
        if not len(keys) or not len(high):
            return np.full(len(keys), -1, dtype=np.int64)
        halves = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2).astype(np.uint64)
        at = np.searchsorted(high, halves[:, 0])
        at_safe = np.minimum(at, len(high) - 1)
        # The first row of equal high halves: a different key sharing 64 bits (about 10^-6 likely among 10
        # million rows) is a miss, and that text is embedded again: never a wrong vector.
        hit = (at < len(high)) & (high[at_safe] == halves[:, 0]) & (low[at_safe] == halves[:, 1])
        return np.where(hit, place[at_safe], -1)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """PREV's stored vectors of these rows (its dtype, (n, width)), in this order."""
        width = self.schema.field(EMBEDDING_COLUMN).type.list_size
        dtype = self.schema.field(EMBEDDING_COLUMN).type.value_type.to_pandas_dtype()
        out = np.empty((len(rows), width), dtype=dtype)
        groups = np.searchsorted(self._starts, rows, side="right") - 1
        for group in np.unique(groups):
            chosen = groups == group
            if self._cached is None or self._cached[0] != group:
                column = self._read(int(group), EMBEDDING_COLUMN)
                # values, not flatten(): flatten leaves out null rows, and rows are counted with them.
                values = column.values.to_numpy(zero_copy_only=False).reshape(-1, width)
                self._cached = (int(group), values[column.offset:column.offset + len(column)])
            out[chosen] = self._cached[1][rows[chosen] - self._starts[group]]
        return out


def key_halves(keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A fixed_size_binary(16) array as (n, 2) uint64 (big-endian halves) and its validity."""
    data = keys.buffers()[1]
    raw = np.frombuffer(data, dtype=np.uint8)[keys.offset * 16:(keys.offset + len(keys)) * 16]
    halves = raw.view(">u8").reshape(-1, 2).astype(np.uint64)
    return halves, keys.is_valid().to_numpy(zero_copy_only=False)
