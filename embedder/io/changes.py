"""The change set of a --reuse run with --id-col: which ids were added, changed or deleted since PREV.

A vector index can then be updated with upserts and deletes instead of being rebuilt. An id's content is the
sequence of its rows' text keys (one row, or its chunks in order): equal sequences are unchanged.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedder.errors import UsageError
from embedder.io.store import Store
from embedder.schema import TEXT_KEY_COLUMN

CHANGE_COLUMN = "change"


def change_set(current: pa.Table, previous: pa.Table, id_col: str) -> pa.Table:
    """(id, change) for every id whose content differs: "added", "changed" or "deleted", sorted by change then id.
    Both tables hold id_col and text_key, rows in output order."""
    now, before = _contents(current, id_col), _contents(previous, id_col)
    joined = now.join(before, id_col, join_type="full outer", left_suffix="_now", right_suffix="_before",
                      use_threads=False)
    new, old = joined.column("content_now"), joined.column("content_before")
    present_now = pc.is_valid(joined.column("rows_now"))
    present_before = pc.is_valid(joined.column("rows_before"))
    same = pc.fill_null(pc.equal(new, old), False)
    both_null = pc.and_(pc.is_null(new), pc.is_null(old))
    unchanged = pc.or_(same, both_null)
    change = pc.if_else(pc.invert(present_before), "added",
                        pc.if_else(pc.invert(present_now), "deleted",
                                   pc.if_else(unchanged, pa.scalar(None, pa.string()), "changed")))
    table = pa.table({id_col: joined.column(id_col), CHANGE_COLUMN: change})
    table = table.filter(pc.is_valid(table.column(CHANGE_COLUMN)))
    return table.sort_by([(CHANGE_COLUMN, "ascending"), (id_col, "ascending")])


def _contents(table: pa.Table, id_col: str) -> pa.Table:
    """One row per id: its text keys concatenated in row order (null if any of its rows has no text)."""
    keys = table.column(TEXT_KEY_COLUMN).cast(pa.binary())
    grouped = (pa.table({id_col: table.column(id_col), "key": keys, "one": pa.repeat(1, table.num_rows)})
               .group_by(id_col, use_threads=False).aggregate([("key", "list"), ("one", "sum")]))
    content = pc.binary_join(grouped.column("key_list"), pa.scalar(b"", pa.binary()))
    return pa.table({id_col: grouped.column(id_col), "content": content, "rows": grouped.column("one_sum")})


def check_id_column(schema: pa.Schema, id_col: str, where: str) -> None:
    if id_col not in schema.names:
        raise UsageError(f"--id-col {id_col}: {where} has no such column (columns: {', '.join(schema.names)})")


def write_change_set(store: Store, path: str, table: pa.Table) -> None:
    """The change set, whole or absent, replacing one a cut-short run left."""
    with store.writer(path, overwrite=True) as sink:
        pq.write_table(table, sink)
