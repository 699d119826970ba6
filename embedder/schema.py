"""The output table's shape, shared by the window embedder, the writers and the run loop: carried columns,
then `embedding` (fixed_size_list<float32>[dim]), and the run's facts in the file's `embedder` metadata."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

EMBEDDING_COLUMN = "embedding"
METADATA_KEY = b"embedder"


def output_schema(keep_schema: pa.Schema, dim: int, metadata: dict) -> pa.Schema:
    """Carried columns, then embedding: fixed_size_list<float32>[dim]; job facts in the metadata."""
    fields = [*keep_schema, pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), dim))]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def embedding_array(vectors: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """Vectors of the valid rows (in row order) spread over all rows; invalid rows become null."""
    rows, dim = len(valid), vectors.shape[1]
    values = np.zeros((rows, dim), dtype=np.float32)
    values[valid] = vectors
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=pa.array(~valid))
