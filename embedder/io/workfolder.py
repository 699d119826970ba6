"""Progress that survives kill -9: a work folder beside OUT with one committed part file per window.

    .OUT.work/fingerprint.json    what the progress belongs to (inputs, model, graph, options)
    .OUT.work/part-000000.parquet one per committed window, appearing only once complete; with --chunk its
                                  `embedder_part` metadata records the input rows it holds
    .OUT.work/_lease              a bucket's lock (on disk the folder itself is flock'ed)

On disk a part is written to a temporary name, fsynced and renamed; in a bucket it is one PUT or one
completed multipart upload (io/store.py). A rerun with the same fingerprint skips the input rows of the committed windows.
OUT is then published:
    a file (OUT has no trailing '/'): the parts merged in order into one file that appears complete (a single
        part is renamed, or copied server-side, into place);
    a folder (OUT ends in '/'): the parts themselves, part-000000.parquet onwards, and a _SUCCESS marker last.
        On disk the finished folder is renamed into place, so a reader sees all of it or nothing; a bucket has
        no rename, so the parts are copied server-side and readers must wait for _SUCCESS.
The work folder is removed afterwards. publish_folder is shared with the Ray driver, whose actors write the
parts of a folder OUT into a staging folder instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

import embedder.hooks as hooks
from embedder.errors import InputError, OutputError, OutputExistsError, UsageError, first_line
from embedder.io.local_store import LocalStore
from embedder.io.store import Store, locate
from embedder.schema import PART_KEY

logger = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
LEASE = "_lease"
SUCCESS = "_SUCCESS"


def part_name(index: int) -> str:
    """The name of part `index` (from 0): the work folder's committed windows and a folder OUT's parts."""
    return f"part-{index:06d}.parquet"


def is_folder_output(spec: str) -> bool:
    """OUT names a folder of parts, not a file: chosen by a trailing '/'."""
    return spec.endswith("/")


class WorkFolder:
    """The committed windows of one job writing OUT (a local path or a bucket URI)."""

    def __init__(self, out: str):
        out = str(out)
        self.folder_output = is_folder_output(out)
        self.store, self.out = locate(out)
        self.out_uri = self.store.uri(self.out) + ("/" if self.folder_output else "")
        if not self.store.parent(self.out):
            raise UsageError(f"--out {out}: name a file or folder inside the bucket (its work folder goes beside "
                             "it), not the bucket itself")
        self.path = self.store.join(self.store.parent(self.out), f".{self.store.name(self.out)}.work")
        # On disk a folder OUT is built inside the work folder and renamed into place whole.
        self._renames = self.folder_output and isinstance(self.store, LocalStore)
        self.parts = self.store.join(self.path, "dataset") if self._renames else self.path
        self._check: Callable[[], None] = lambda: None
        self.input_rows: list[int] = []  # input rows of each committed part, from prepare()

    def _part(self, index: int) -> str:
        return self.store.join(self.parts, part_name(index))

    def has_progress(self) -> bool:
        return self.store.read_bytes(self.store.join(self.path, FINGERPRINT)) is not None

    def check_output(self, overwrite: bool) -> None:
        """Refuse an existing OUT (unless overwrite) and a place we cannot write, before any work."""
        store, out = self.store, self.out
        if store.is_folder(out) and not self.folder_output:
            raise UsageError(f"output {self.out_uri} is a folder; give a file path, or end it with '/' to write "
                             "a folder of parts")
        if self.folder_output and store.entry(out) is not None:
            raise UsageError(f"output {self.out_uri} is a file; drop the trailing '/' to write a file")
        exists = store.is_folder(out) if self.folder_output else store.entry(out) is not None
        # A bucket's folder OUT without _SUCCESS, beside our progress, is a publish cut short: finish it.
        unfinished = (self.folder_output and not self._renames and exists and self.has_progress()
                      and store.entry(store.join(out, SUCCESS)) is None)
        if exists and not overwrite and not unfinished:
            raise OutputExistsError(f"output {self.out_uri} exists; pass --overwrite to replace it")
        store.check_writable(store.parent(out) or out)

    @contextlib.contextmanager
    def locked(self, take_over: bool = False):
        """Hold the work folder's lock: a second job writing the same OUT fails at once."""
        with self.store.lock(self.path, self.out_uri, take_over) as check:
            self._check = check
            try:
                yield self
            except BaseException:
                self._remove_if_uncommitted()  # a failed run with nothing to resume leaves nothing behind
                raise
            finally:
                self._check = lambda: None

    def _committed_names(self) -> set[str]:
        return {self.store.name(e.path) for e in self.store.list_files(self.parts)}

    def _remove_if_uncommitted(self) -> None:
        with contextlib.suppress(Exception):
            if not any(name.startswith("part-") for name in self._committed_names()):
                self.store.delete_folder(self.path)

    def prepare(self, fingerprint: dict, restart: bool, require_resume: bool, one_row_per_input: bool = True,
                window_rows: int | None = None) -> int:
        """Number of windows already committed for this fingerprint (0 for a fresh start); input_rows then holds
        the input rows of each: its rows, or (--chunk: one_row_per_input false) the count its metadata records.

        A committed part that is unreadable, lacks a record it needs, or holds more input rows than window_rows
        is dropped with every part after it, and those windows are redone.
        """
        store = self.store
        stored_file = store.join(self.path, FINGERPRINT)
        if restart:
            self._clear()
        raw = store.read_bytes(stored_file)
        stored = json.loads(raw) if raw is not None else None
        if stored is not None and stored != fingerprint:
            differs = sorted(k for k in fingerprint.keys() | stored.keys() if fingerprint.get(k) != stored.get(k))
            raise UsageError(
                f"{store.uri(self.path)} holds progress of a run with different {', '.join(differs)}; rerun with "
                "the original options to resume it, or add --restart to discard it"
            )
        store.clear_strays(self.path, self.out)  # we hold the lock: nothing half-written belongs to a live job
        names = self._committed_names()
        committed = 0
        self.input_rows = []
        while part_name(committed) in names:
            damage = self._damage(committed, one_row_per_input, window_rows)
            if damage is not None:
                logger.warning("committed part %s is damaged (%s); redoing window %d and the ones after it",
                               part_name(committed), damage, committed)
                self._drop_from(committed, names)
                break
            committed += 1
        if stored is None:
            if require_resume:
                raise UsageError(f"--resume: there is no progress to resume in {store.uri(self.path)}")
            store.put_bytes(stored_file, json.dumps(fingerprint, indent=2, sort_keys=True).encode())
        elif committed:
            logger.info("resuming: %d windows already committed in %s", committed, store.uri(self.path))
        return committed

    def _damage(self, index: int, one_row_per_input: bool, window_rows: int | None) -> str | None:
        """Why committed part `index` cannot be used (its footer is read, not its pages), or None; a usable part's
        input rows are appended to input_rows."""
        try:
            with self.store.open_input(self._part(index)) as source:
                footer = pq.ParquetFile(source).metadata
        except (pa.ArrowInvalid, OSError) as e:
            return f"unreadable: {first_line(e)}"
        record = (footer.metadata or {}).get(PART_KEY)
        if record is None:
            if not one_row_per_input:
                return "no record of the input rows it holds"
            rows = footer.num_rows
        else:
            try:
                rows = int(json.loads(record)["input_rows"])
            except (KeyError, ValueError, TypeError):
                return "a damaged record of the input rows it holds"
        if window_rows is not None and rows > window_rows:
            return f"{rows} input rows where a window holds at most {window_rows}"
        self.input_rows.append(rows)
        return None

    def _drop_from(self, index: int, names: set[str] | None = None) -> None:
        names = self._committed_names() if names is None else names
        while part_name(index) in names:
            self.store.delete(self._part(index))
            index += 1

    def part_schema(self, index: int) -> pa.Schema:
        """The schema, metadata included, that committed part `index` was written with."""
        with self.store.open_input(self._part(index)) as source:
            return pq.read_schema(source)

    def commit(self, index: int, table: pa.Table, input_rows: int | None = None) -> None:
        """Write one window's rows, made of input_rows input rows (by default one each: then nothing is recorded,
        and OUT's metadata stays the job's); it counts as committed only once it appears whole."""
        self._check()  # a lost lease: another job owns OUT now
        if input_rows is not None and input_rows != table.num_rows:
            record = json.dumps({"input_rows": input_rows}).encode()
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), PART_KEY: record})
        try:
            write_part(self.store, self._part(index), table)
        except OSError as e:
            raise OutputError(f"committing window {index} to {self.store.uri(self.path)} failed: "
                              f"{first_line(e)}") from e

    def publish(self, schema: pa.Schema, overwrite: bool, windows: int) -> int:
        """Make OUT from the committed parts (a file or a folder, as OUT was named); return the row count."""
        self._check()
        if self.folder_output:
            return self._publish_folder(schema, overwrite, windows)
        if windows == 1:
            return self._move_only_part(overwrite)
        return self._merge(schema, overwrite, windows)

    def _merge(self, schema: pa.Schema, overwrite: bool, windows: int) -> int:
        """Copy the committed parts, in order, into one OUT that appears complete."""
        rows = 0
        try:
            with self.store.writer(self.out, overwrite) as sink, pq.ParquetWriter(sink, schema) as output:
                for index in range(windows):
                    for table in self._read_part(index):
                        output.write_table(table)
                        rows += table.num_rows
                    hooks.reached("merge", index + 1)
        except (OutputExistsError, _CorruptPart):
            raise
        except OSError as e:  # writing OUT failed (a full disk): the parts are fine, a rerun resumes
            raise OutputError(f"writing {self.out_uri} failed: {first_line(e)}") from e
        return rows

    def _read_part(self, index: int) -> Iterator[pa.Table]:
        """Part `index`'s row groups, its pages checked; a corrupt part is dropped with the parts after it."""
        part = self._part(index)
        try:
            with self.store.open_input(part) as source:
                reader = pq.ParquetFile(source, page_checksum_verification=True)
                for group in range(reader.num_row_groups):
                    yield reader.read_row_group(group)
        except (pa.ArrowInvalid, OSError) as e:
            self._drop_from(index)
            raise _CorruptPart(f"committed part {self.store.uri(part)} is corrupt ({first_line(e)}); it and the parts "
                               "after it are removed: rerun the same command to redo those windows") from e

    def columns(self, windows: int, names: list[str]) -> pa.Table:
        """These columns of the committed parts, in order (the change set reads ids and keys before publishing)."""
        parts = []
        for index in range(windows):
            with self.store.open_input(self._part(index)) as source:
                parts.append(pq.read_table(source, columns=names))
        return pa.concat_tables(parts)

    def _move_only_part(self, overwrite: bool) -> int:
        """A one-window job: its committed part, written with OUT's schema, is OUT.

        Moving it saves decoding and re-encoding every vector (half the write time of such a job).
        """
        part = self._part(0)
        try:
            with self.store.open_input(part) as source:
                rows = pq.ParquetFile(source).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"committed part {self.store.uri(part)} is unreadable ({first_line(e)}); rerun with "
                             "--restart") from e
        self.store.move(part, self.out, overwrite)
        return rows

    def _publish_folder(self, schema: pa.Schema, overwrite: bool, windows: int) -> int:
        store = self.store
        if windows == 0:  # no rows: one empty part that still carries the schema and metadata
            self.commit(0, schema.empty_table())
            windows = 1
        rows = 0
        for index in range(windows):
            with store.open_input(self._part(index)) as source:
                rows += pq.ParquetFile(source).metadata.num_rows
        # A bucket's OUT without _SUCCESS is our own publish cut short (check_output let it through): replace it.
        unfinished = not self._renames and store.entry(store.join(self.out, SUCCESS)) is None
        publish_folder(store, [self._part(index) for index in range(windows)], self.out, overwrite or unfinished)
        return rows

    def remove(self) -> None:
        self.store.delete_folder(self.path)

    def _clear(self) -> None:
        for entry in self.store.list_files(self.path):
            if self.store.name(entry.path) != LEASE:
                self.store.delete(entry.path)


class _CorruptPart(OutputError):
    """A committed part failed its page checksums while being merged."""


def write_part(store: Store, path: str, table: pa.Table) -> None:
    """One Parquet file (page checksums on) that appears at path whole or not at all."""
    with store.writer(path) as sink, pq.ParquetWriter(sink, table.schema, write_page_checksum=True) as writer:
        writer.write_table(table)


def publish_folder(store: Store, parts: list[str], out: str, overwrite: bool) -> None:
    """Publish parts (store paths, in this order) as the folder OUT: part-000000.parquet onwards, _SUCCESS last.

    On disk the parts are every file of one folder, which becomes OUT: each is renamed to its part name there,
    _SUCCESS is added, and the folder is renamed into place, so a reader sees all of it or nothing. A bucket
    cannot rename: OUT is cleared, the parts are copied server-side, and _SUCCESS is written last (readers wait
    for it); the parts stay where they are, for the caller to remove. Either way an OUT that exists is replaced
    only with overwrite (OutputExistsError otherwise: it appeared after the start's check).
    """
    if not parts:
        raise ValueError("publish_folder needs at least one part (write an empty one that carries the schema)")
    if isinstance(store, LocalStore):
        folder = store.parent(parts[0])
        names = [store.name(part) for part in parts]
        targets = [part_name(index) for index in range(len(parts))]
        if any(store.parent(p) != folder for p in parts) or any(
                n != t and n in targets for n, t in zip(names, targets)):  # a rename would overwrite a later part
            raise ValueError(f"parts to publish must share one folder and not take each other's names: {parts}")
        for part, name, target in zip(parts, names, targets):
            if name != target:
                store.move(part, store.join(folder, target))
        store.put_bytes(store.join(folder, SUCCESS), b"")
        store.move(folder, out, overwrite)
        return
    if not overwrite and store.is_folder(out):
        raise OutputExistsError(f"output {store.uri(out)}/ appeared while the job ran; not replacing it")
    store.delete_folder(out)
    for index, part in enumerate(parts):
        store.copy(part, store.join(out, part_name(index)))
        hooks.reached("merge", index + 1)
    store.put_bytes(store.join(out, SUCCESS), b"")


def check_output(out: str, overwrite: bool) -> None:
    """Refuse an existing OUT (unless overwrite) and an output place we cannot write, before any work."""
    WorkFolder(out).check_output(overwrite)
