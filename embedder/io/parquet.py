"""Streaming Parquet input from a local disk or a bucket: resolve, validate, read row groups in order."""

from __future__ import annotations

import glob
import logging
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import InputError, UsageError, first_line
from embedder.io.store import FileEntry, Store, in_byte_order, locate
from embedder.schema import EMBEDDING_COLUMN

logger = logging.getLogger(__name__)

def resolve_inputs(spec: str) -> tuple[Store, list[FileEntry]]:
    """One Parquet file, a folder of them (recursively), or a glob; local or in a bucket.

    Files come in the byte order of their paths, the same on every store. In a folder, names starting with
    '.' or '_' are skipped at every level (work folders, _SUCCESS markers, Spark's _temporary).
    """
    store, path = locate(spec)
    if glob.has_magic(path):
        files = [e for e in store.glob(path) if not store.name(e.path).startswith((".", "_"))]
        if not files:
            _explain_nothing(store, path)
            raise InputError(f"input glob {spec} matches no files")
        return store, in_byte_order(files)
    entry = store.entry(path) if not spec.endswith("/") else None
    if entry is not None:
        return store, [entry]
    if store.is_folder(path):
        files = [e for e in store.list_files(path) if e.path.endswith(".parquet")
                 and not any(part.startswith((".", "_")) for part in posixpath.relpath(e.path, path).split("/"))]
        if not files:
            raise InputError(f"input folder {spec} holds no .parquet files")
        return store, in_byte_order(files)
    _explain_nothing(store, path)
    raise InputError(f"input {spec} does not exist")


def _explain_nothing(store: Store, path: str) -> None:
    """Where nothing was found in a bucket, say if the bucket itself is missing or forbidden."""
    check_bucket = getattr(store, "check_bucket", None)
    if check_bucket is not None:
        check_bucket(path)


def is_text_type(arrow_type: pa.DataType) -> bool:
    """A text column's type: string (plain, large, view), binary read as UTF-8 (plain, large), or a dictionary of one."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return any(check(arrow_type) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
                                              pa.types.is_binary, pa.types.is_large_binary))


@dataclass(frozen=True)
class Unit:
    """One row group of one file (a store path): the grain of sharding and of resuming."""

    file: str
    row_group: int
    rows: int


@dataclass(frozen=True)
class InputSet:
    """Validated input: the row groups to read, in order, and the schema of the carried columns."""

    units: tuple[Unit, ...]
    text_cols: tuple[str, ...]  # the text column, or the columns a --text-template names
    keep_schema: pa.Schema
    store: Store
    versions: dict[str, str]  # each file's version (size and mtime, or ETag) when it was checked

    @property
    def keep_cols(self) -> list[str]:
        return self.keep_schema.names

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(u.file for u in self.units))

    def uris(self) -> list[str]:
        return [self.store.uri(f) for f in self.files]

    @property
    def total_rows(self) -> int:
        return sum(u.rows for u in self.units)

    def shard(self, index: int, count: int) -> InputSet:
        """A contiguous, row-balanced part of the row groups; shards 0..count-1 in order are the whole."""
        total = self.total_rows
        chosen, start = [], 0
        for unit in self.units:
            # A row group belongs to the shard its first row falls in.
            if (start * count // total if total else 0) == index:
                chosen.append(unit)
            start += unit.rows
        return InputSet(tuple(chosen), self.text_cols, self.keep_schema, self.store, self.versions)


def open_inputs(spec: str, text_cols: str | tuple[str, ...], keep_cols: list[str] | None) -> InputSet:
    """Check every file's footer and schema before any work: bad input fails in the first second."""
    text_cols = (text_cols,) if isinstance(text_cols, str) else tuple(text_cols)
    store, entries = resolve_inputs(spec)
    files = [store.uri(e.path) for e in entries]
    keep_schema: pa.Schema | None = None
    units: list[Unit] = []
    for entry, path in zip(entries, files):
        try:
            with store.open_input(entry.path) as source:
                meta = pq.read_metadata(source)
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path} is not a readable Parquet file: {first_line(e)}") from e
        missing = [n for n in text_cols if n not in schema.names]
        if missing:
            names = ", ".join(f"'{n}'" for n in missing)
            raise InputError(f"{path}: column{'s' if len(missing) > 1 else ''} {names} not found; columns are: "
                             f"{', '.join(schema.names)}")
        for text_col in text_cols:
            text_type = schema.field(text_col).type
            if not is_text_type(text_type):
                raise InputError(
                    f"{path}: column '{text_col}' is {text_type}, not a string or binary (UTF-8) column; "
                    "choose one with --text-col"
                )
        if keep_schema is None:
            names = [n for n in schema.names if n not in text_cols] if keep_cols is None else keep_cols
            missing = [n for n in names if n not in schema.names]
            if missing:
                raise InputError(f"{path}: --keep-cols {', '.join(missing)} not found; columns are: {', '.join(schema.names)}")
            if EMBEDDING_COLUMN in names:
                raise UsageError(f"input already has a column '{EMBEDDING_COLUMN}'; leave it out with --keep-cols")
            keep_schema = pa.schema([schema.field(n) for n in names])
        else:
            missing = [n for n in keep_schema.names if n not in schema.names]
            if missing:
                raise InputError(f"{path}: columns {', '.join(missing)} are missing (present in {files[0]})")
            keep_schema = _widen(keep_schema, schema)
            extra = [n for n in schema.names if n not in text_cols and n not in keep_schema.names]
            if extra and keep_cols is None:
                logger.warning("%s: columns %s are not in %s and are not carried to the output (name the columns "
                               "with --keep-cols to silence this)", path, ", ".join(extra), files[0])
        units += [Unit(entry.path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    assert keep_schema is not None
    return InputSet(tuple(units), text_cols, keep_schema, store, {e.path: e.version for e in entries})


def _widen(keep_schema: pa.Schema, schema: pa.Schema) -> pa.Schema:
    """The carried columns' types widened to hold this file's too (int32 and int64 -> int64).

    Types that do not unify keep the first file's type; reading then casts (checked) or fails naming the column.
    """
    fields = []
    for field in keep_schema:
        other = schema.field(field.name)
        if other.type != field.type:
            try:
                field = pa.unify_schemas([pa.schema([field]), pa.schema([other])], promote_options="permissive").field(0)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                pass
        fields.append(field)
    return pa.schema(fields)


def iter_record_batches(inputs: InputSet, batch_rows: int, skip_rows: int = 0) -> Iterator[pa.RecordBatch]:
    """Record batches of the carried columns plus the text column(s) (as plain strings), in order.

    skip_rows rows are skipped without reading the row groups that hold only skipped rows.
    """
    columns = [*inputs.keep_cols, *inputs.text_cols]
    target = pa.schema([*inputs.keep_schema, *(pa.field(c, pa.large_string()) for c in inputs.text_cols)])
    for file in inputs.files:
        path = inputs.store.uri(file)
        units = [u for u in inputs.units if u.file == file]
        groups = []
        for unit in units:
            if not groups and skip_rows >= unit.rows:  # only leading row groups: the rest are read, then sliced
                skip_rows -= unit.rows
            else:
                groups.append(unit.row_group)
        if not groups:
            continue
        try:
            source = inputs.store.open_input(file)
        except OSError as e:
            raise InputError(f"{path}: cannot open: {first_line(e)}") from e
        try:
            if inputs.versions.get(file) != (now := _version(inputs.store, file)):
                raise InputError(f"{path} changed while the job ran (was {inputs.versions.get(file)}, now {now}); "
                                 "rerun when the input is final")
            reader = pq.ParquetFile(source, page_checksum_verification=True)  # where the writer stored CRCs
            file_row = sum(reader.metadata.row_group(i).num_rows for i in range(groups[0]))
            for batch in reader.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
                file_row += batch.num_rows
                if skip_rows:
                    batch, skip_rows = batch.slice(min(skip_rows, batch.num_rows)), max(0, skip_rows - batch.num_rows)
                    if not batch.num_rows:
                        continue
                first = file_row - batch.num_rows
                for text_col in inputs.text_cols:
                    check_utf8(batch.column(text_col), text_col, lambda row: str(first + row), f"{path}: ")
                if batch.schema != target:
                    batch = _conform(batch, target, path)
                yield batch
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise InputError(f"{path}: cannot read: {first_line(e)}") from e
        finally:
            source.close()


def _version(store: Store, path: str) -> str | None:
    entry = store.entry(path)
    return None if entry is None else entry.version


def _conform(batch: pa.RecordBatch, target: pa.Schema, path: str) -> pa.RecordBatch:
    """Decode dictionaries and cast to the first file's types, so every output row group agrees."""
    arrays = []
    for field in target:
        column = batch.column(field.name)
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        try:
            arrays.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(f"{path}: column '{field.name}' is {column.type}, cannot be read as {field.type}: {e}") from e
    return pa.RecordBatch.from_arrays(arrays, schema=target)


def check_utf8(column: pa.Array | pa.ChunkedArray, name: str, row_label: Callable[[int], str], where: str = "") -> None:
    """Text must be valid UTF-8, binary or string alike (Parquet readers do not check string pages, so a
    damaged or mislabelled file gets here); name the first bad row (row_label(index in column)) rather than
    guess an encoding. where prefixes the message (the file)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.dictionary if pa.types.is_dictionary(column.type) else column
    try:
        if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            values.cast(pa.large_string())
        else:
            values.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        column = column.cast(pa.large_binary())  # string to binary does not validate
    for row, value in enumerate(column.to_pylist()):
        try:
            value is None or value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                f"{where}column '{name}' holds bytes that are not valid UTF-8 (row {row_label(row)}: {e.reason} "
                f"at byte {e.start}); decode or clean the text before embedding"
            ) from None
