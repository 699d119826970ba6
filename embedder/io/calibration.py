"""--calibration FILE: float vectors, in a Parquet file's `embedding` column, that int8/uint8 ranges come from."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedder.errors import InputError, first_line
from embedder.io.store import locate
from embedder.schema import EMBEDDING_COLUMN


def read_calibration(spec: str) -> tuple[np.ndarray, str]:
    """(the file's non-null vectors as float32 rows, its URI): a local path or a bucket URI, as --in takes them."""
    store, path = locate(spec)
    uri = store.uri(path)
    if store.entry(path) is None:
        raise InputError(f"--calibration {uri} does not exist")
    try:
        with store.open_input(path) as source:
            schema = pq.read_schema(source)
            if EMBEDDING_COLUMN not in schema.names:
                raise InputError(f"--calibration {uri} has no '{EMBEDDING_COLUMN}' column; columns are: "
                                 f"{', '.join(schema.names)}")
            column = pq.read_table(source, columns=[EMBEDDING_COLUMN]).column(EMBEDDING_COLUMN).combine_chunks()
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"--calibration {uri} is not a readable Parquet file: {first_line(e)}") from e
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_floating(kind.value_type):
        raise InputError(f"--calibration {uri}: '{EMBEDDING_COLUMN}' is {kind}, not a list of floats (calibrate on "
                         "float vectors, such as --output-dtype float32 output)")
    column = column.drop_null()
    lengths = set(pc.list_value_length(column).to_pylist()) if len(column) else set()
    if len(lengths) > 1:
        raise InputError(f"--calibration {uri}: vectors of several lengths ({', '.join(map(str, sorted(lengths)))})")
    width = lengths.pop() if lengths else 0
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(column), width), uri
