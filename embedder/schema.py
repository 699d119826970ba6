"""The output table's shape, shared by the window embedder, the writers and the run loop: carried columns,
then (with --chunk) `chunk`, `chunk_start` and `chunk_end`, or (with --chunk-pooling) `chunks`, then `text_key`
(the jobs' default; not with --no-text-key nor from Embedder.embed), then (with --with-token-counts) `tokens`
and `truncated`, then `embedding`, and the run's facts in the file's `embedder` metadata.

`embedding` is a fixed_size_list of the --output-dtype's Arrow type: float32, float16 (halffloat), int8 or
uint8 holding one value per dimension, or int8 (binary) / uint8 (ubinary) holding 8 dimensions per byte.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

EMBEDDING_COLUMN = "embedding"
TOKENS_COLUMN = "tokens"
TRUNCATED_COLUMN = "truncated"
CHUNK_COLUMN = "chunk"
CHUNK_START_COLUMN = "chunk_start"
CHUNK_END_COLUMN = "chunk_end"
CHUNKS_COLUMN = "chunks"
TEXT_KEY_COLUMN = "text_key"
TEXT_KEY_TYPE = pa.binary(16)
METADATA_KEY = b"embedder"
# A committed part's own key: the input rows it holds (with --chunk a part has more rows than it read).
PART_KEY = b"embedder_part"

# --chunk's columns: one row per chunk, or (--chunk-pooling) one row per text with its number of chunks.
CHUNK_FIELDS = {
    "rows": (pa.field(CHUNK_COLUMN, pa.int32()), pa.field(CHUNK_START_COLUMN, pa.int64()),
             pa.field(CHUNK_END_COLUMN, pa.int64())),
    "pooled": (pa.field(CHUNKS_COLUMN, pa.int32()),),
}

# --output-dtype -> (numpy dtype of a stored value, dimensions per stored value)
OUTPUT_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "float32": (np.dtype(np.float32), 1),
    "float16": (np.dtype(np.float16), 1),
    "int8": (np.dtype(np.int8), 1),
    "uint8": (np.dtype(np.uint8), 1),
    "binary": (np.dtype(np.int8), 8),
    "ubinary": (np.dtype(np.uint8), 8),
}


def stored_width(dtype: str, dim: int) -> int:
    """Values per stored vector: dim, or dim / 8 rounded up for the packed binary dtypes (numpy.packbits pads
    the last byte with zero bits, as sentence-transformers' quantize_embeddings does)."""
    per_value = OUTPUT_DTYPES[dtype][1]
    return -(-dim // per_value)


def embedding_type(dtype: str, dim: int) -> pa.DataType:
    """The `embedding` column's type for vectors of dim dimensions stored as dtype."""
    return pa.list_(pa.from_numpy_dtype(OUTPUT_DTYPES[dtype][0]), stored_width(dtype, dim))


def output_schema(keep_schema: pa.Schema, dim: int, metadata: dict, dtype: str = "float32",
                  token_counts: bool = False, chunks: str | None = None, text_key: bool = False) -> pa.Schema:
    """Carried columns, then CHUNK_FIELDS[chunks] ("rows" or "pooled") with --chunk, text_key if asked,
    tokens: int32 and truncated: bool if asked, then embedding; job facts in the metadata."""
    fields = list(keep_schema)
    if chunks is not None:
        fields += CHUNK_FIELDS[chunks]
    if text_key:
        fields.append(pa.field(TEXT_KEY_COLUMN, TEXT_KEY_TYPE))
    if token_counts:
        fields += [pa.field(TOKENS_COLUMN, pa.int32()), pa.field(TRUNCATED_COLUMN, pa.bool_())]
    fields.append(pa.field(EMBEDDING_COLUMN, embedding_type(dtype, dim)))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def embedding_array(vectors: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """Vectors of the valid rows (in row order, any stored dtype) spread over all rows; invalid rows become null."""
    rows, width = len(valid), vectors.shape[1]
    values = np.zeros((rows, width), dtype=vectors.dtype)
    values[valid] = vectors
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width, mask=pa.array(~valid))


def token_count_arrays(lengths: np.ndarray, truncated: np.ndarray, valid: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """`tokens` (int32) and `truncated` (bool) of the valid rows spread over all rows; invalid rows are null."""
    counts = np.zeros(len(valid), dtype=np.int32)
    counts[valid] = lengths
    cut = np.zeros(len(valid), dtype=bool)
    cut[valid] = truncated
    mask = ~valid
    return pa.array(counts, mask=mask), pa.array(cut, mask=mask)


def key_array(keys: np.ndarray, valid: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Text keys ((n valid, 16) uint8, in row order) spread over all rows as text_key; invalid rows are null."""
    values = np.zeros((len(valid), 16), dtype=np.uint8)
    values[valid] = keys
    validity = None if valid.all() else pa.array(valid).buffers()[1]
    return pa.FixedSizeBinaryArray.from_buffers(TEXT_KEY_TYPE, len(valid), [validity, pa.py_buffer(values.tobytes())],
                                                null_count=int((~valid).sum()))
