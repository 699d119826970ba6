"""Streaming Parquet input, atomic Parquet output, and the output schema and metadata."""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import InputError, OutputError, OutputExistsError, UsageError
from embedder.schema import EMBEDDING_COLUMN

logger = logging.getLogger(__name__)

def resolve_inputs(spec: str) -> list[Path]:
    """One Parquet file, a folder of them (recursively, in name order), or a glob."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*.parquet")
            if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
        )
        if not files:
            raise InputError(f"input folder {spec} holds no .parquet files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"input glob {spec} matches no files")
        return files
    raise InputError(f"input {spec} does not exist")


def is_text_type(arrow_type: pa.DataType) -> bool:
    """A text column's type: string (plain, large, view), binary read as UTF-8 (plain, large), or a dictionary of one."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return any(check(arrow_type) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
                                              pa.types.is_binary, pa.types.is_large_binary))


@dataclass(frozen=True)
class Unit:
    """One row group of one file: the grain of sharding and of resuming."""

    file: Path
    row_group: int
    rows: int


@dataclass(frozen=True)
class InputSet:
    """Validated input: the row groups to read, in order, and the schema of the carried columns."""

    units: tuple[Unit, ...]
    text_col: str
    keep_schema: pa.Schema

    @property
    def keep_cols(self) -> list[str]:
        return self.keep_schema.names

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys(u.file for u in self.units))

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
        return InputSet(tuple(chosen), self.text_col, self.keep_schema)


def open_inputs(spec: str, text_col: str, keep_cols: list[str] | None) -> InputSet:
    """Check every file's footer and schema before any work: bad input fails in the first second."""
    files = resolve_inputs(spec)
    keep_schema: pa.Schema | None = None
    units: list[Unit] = []
    for path in files:
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path} is not a readable Parquet file: {e}") from e
        if text_col not in schema.names:
            raise InputError(f"{path}: column '{text_col}' not found; columns are: {', '.join(schema.names)}")
        text_type = schema.field(text_col).type
        if not is_text_type(text_type):
            raise InputError(
                f"{path}: column '{text_col}' is {text_type}, not a string or binary (UTF-8) column; "
                "choose one with --text-col"
            )
        if keep_schema is None:
            names = [n for n in schema.names if n != text_col] if keep_cols is None else keep_cols
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
            extra = [n for n in schema.names if n != text_col and n not in keep_schema.names]
            if extra and keep_cols is None:
                logger.warning("%s: columns %s are not in %s and are not carried to the output (name the columns "
                               "with --keep-cols to silence this)", path, ", ".join(extra), files[0])
        units += [Unit(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    assert keep_schema is not None
    return InputSet(tuple(units), text_col, keep_schema)


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
    """Record batches of the carried columns plus the text column (as plain strings), in order.

    skip_rows rows are skipped without reading the row groups that hold only skipped rows.
    """
    columns = [*inputs.keep_cols, inputs.text_col]
    target = inputs.keep_schema.append(pa.field(inputs.text_col, pa.large_string()))
    for path in inputs.files:
        units = [u for u in inputs.units if u.file == path]
        groups = []
        for unit in units:
            if skip_rows >= unit.rows:
                skip_rows -= unit.rows
            else:
                groups.append(unit.row_group)
        if not groups:
            continue
        try:
            reader = pq.ParquetFile(path, page_checksum_verification=True)  # where the writer stored CRCs
            file_row = sum(reader.metadata.row_group(i).num_rows for i in range(groups[0]))
            for batch in reader.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
                file_row += batch.num_rows
                if skip_rows:
                    batch, skip_rows = batch.slice(min(skip_rows, batch.num_rows)), max(0, skip_rows - batch.num_rows)
                    if not batch.num_rows:
                        continue
                first = file_row - batch.num_rows
                check_utf8(batch.column(inputs.text_col), inputs.text_col, lambda row: str(first + row), f"{path}: ")
                if batch.schema != target:
                    batch = _conform(batch, target, path)
                yield batch
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise InputError(f"{path}: cannot read: {e}") from e


def _conform(batch: pa.RecordBatch, target: pa.Schema, path: Path) -> pa.RecordBatch:
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


def check_output(out: Path, overwrite: bool, folder: bool = False) -> None:
    """Refuse an existing OUT (unless overwrite) and an output folder we cannot write, before any work.

    folder: OUT is a folder of part files (the Ray job), not a file.
    """
    if out.is_dir() and not folder:
        raise UsageError(f"output {out} is a folder; give a file path")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {out} exists; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist")
    # Probe with a real file: permission bits say nothing for root or read-only mounts.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"output folder {parent} is not writable: {e.strerror}") from e


class ParquetOutput:
    """Writes row groups to a hidden temporary file beside OUT and renames it into place on success.

    Nothing appears at OUT until every row is written; on any error the temporary file is removed.
    """

    def __init__(self, out: Path, schema: pa.Schema, overwrite: bool):
        self.out = out
        self.schema = schema
        self.overwrite = overwrite
        self.tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ParquetOutput:
        try:
            self._writer = pq.ParquetWriter(self.tmp, self.schema)
        except OSError as e:
            raise OutputError(f"cannot create {self.tmp}: {e}") from e
        return self

    def write(self, table: pa.Table) -> None:
        try:
            self._writer.write_table(table)
        except OSError as e:
            raise OutputError(f"writing {self.tmp} failed: {e}") from e
        self.rows += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._writer.close()
            if exc_type is None:
                if self.out.exists() and not self.overwrite:
                    raise OutputExistsError(f"output {self.out} appeared while the job ran; not replacing it")
                os.replace(self.tmp, self.out)
        except OSError as e:
            if exc_type is None:
                raise OutputError(f"finishing {self.out} failed: {e}") from e
        finally:
            self.tmp.unlink(missing_ok=True)
