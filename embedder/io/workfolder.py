"""Progress that survives kill -9: a work folder beside OUT with one committed part file per window.

    .OUT.work/fingerprint.json   what the progress belongs to (inputs, model, graph, options)
    .OUT.work/part-000000.parquet one per committed window, written to a temporary name, fsynced, renamed

A rerun with the same fingerprint skips the committed windows; the final OUT is the parts merged in
order, written atomically (a single part is renamed into place), after which the work folder is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import embedder.hooks as hooks
from embedder.errors import InputError, LockedError, OutputError, OutputExistsError, UsageError, first_line
from embedder.io.atomic import fsync_path, write_bytes_atomic
from embedder.io.parquet import ParquetOutput

logger = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"


def part_name(index: int) -> str:
    """The name of part `index` (from 0): the work folder's committed windows and the Ray job's output parts."""
    return f"part-{index:06d}.parquet"


class WorkFolder:
    """The committed windows of one job writing OUT."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.with_name(f".{out.name}.work")

    @contextlib.contextmanager
    def locked(self):
        """Hold an exclusive lock on the work folder: a second job writing the same OUT fails at once."""
        try:
            self.path.mkdir(exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise OutputError(f"cannot create work folder {self.path}: {e}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockedError(f"another job is writing {self.out} (its work folder {self.path} is locked)") from None
            try:
                yield self
            except BaseException:
                self._remove_if_uncommitted()  # a failed run with nothing to resume leaves nothing behind
                raise
        finally:
            os.close(fd)

    def _remove_if_uncommitted(self) -> None:
        if not any(self.path.glob("part-*.parquet")):
            shutil.rmtree(self.path, ignore_errors=True)

    def prepare(self, fingerprint: dict, restart: bool, require_resume: bool,
                expected_rows: Callable[[int], int] | None = None) -> int:
        """Number of windows already committed for this fingerprint (0 for a fresh start).

        expected_rows(i), if given, is the row count window i must have: a committed part that is truncated,
        unreadable or of another size is dropped with every part after it, and those windows are redone.
        """
        stored_file = self.path / FINGERPRINT
        if restart:
            self._clear()
        stored = json.loads(stored_file.read_text()) if stored_file.is_file() else None
        if stored is not None and stored != fingerprint:
            differs = sorted(k for k in fingerprint.keys() | stored.keys() if fingerprint.get(k) != stored.get(k))
            raise UsageError(
                f"{self.path} holds progress of a run with different {', '.join(differs)}; rerun with the "
                "original options to resume it, or add --restart to discard it"
            )
        # Temporary files of a killed run (a part being written, a final write): we hold the lock,
        # so none of them belongs to a live job.
        for stray in [*self.path.glob(".*.tmp"), *self.out.parent.glob(f".{self.out.name}.*.tmp")]:
            stray.unlink(missing_ok=True)
        committed = 0
        while (self.path / part_name(committed)).is_file():
            damage = self._damage(committed, expected_rows) if expected_rows is not None else None
            if damage is not None:
                logger.warning("committed part %s is damaged (%s); redoing window %d and the ones after it",
                               part_name(committed), damage, committed)
                self._drop_from(committed)
                break
            committed += 1
        if stored is None:
            if require_resume:
                raise UsageError(f"--resume: there is no progress to resume in {self.path}")
            write_bytes_atomic(stored_file, json.dumps(fingerprint, indent=2, sort_keys=True).encode())
        elif committed:
            logger.info("resuming: %d windows already committed in %s", committed, self.path)
        return committed

    def _damage(self, index: int, expected_rows: Callable[[int], int]) -> str | None:
        """Why committed part `index` cannot be used (its footer is read, not its pages), or None."""
        try:
            rows = pq.ParquetFile(self.path / part_name(index)).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            return f"unreadable: {e}"
        want = expected_rows(index)
        return None if rows == want else f"{rows} rows where the window has {max(want, 0)}"

    def _drop_from(self, index: int) -> None:
        while (self.path / part_name(index)).is_file():
            (self.path / part_name(index)).unlink()
            index += 1

    def commit(self, index: int, table: pa.Table) -> None:
        """Write one window's rows; it counts as committed only once renamed into place."""
        final = self.path / part_name(index)
        tmp = self.path / f".{final.name}.tmp"
        try:
            with pq.ParquetWriter(tmp, table.schema, write_page_checksum=True) as writer:
                writer.write_table(table)
            fsync_path(tmp)
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"committing window {index} to {self.path} failed: {e}") from e

    def merge_into(self, out: Path, schema: pa.Schema, overwrite: bool, windows: int) -> int:
        """Copy the committed parts, in order, into OUT (atomically); return the row count."""
        if windows == 1:
            return self._rename_only_part(out, overwrite)
        with ParquetOutput(out, schema, overwrite) as output:
            for index in range(windows):
                part = self.path / part_name(index)
                try:
                    reader = pq.ParquetFile(part, page_checksum_verification=True)
                    for group in range(reader.num_row_groups):
                        output.write(reader.read_row_group(group))
                except OutputError:
                    raise  # writing OUT failed (a full disk): the parts are fine, a rerun resumes
                except (pa.ArrowInvalid, OSError) as e:
                    self._drop_from(index)
                    raise OutputError(f"committed part {part} is corrupt ({first_line(e)}); it and the parts after "
                                      "it are removed: rerun the same command to redo those windows") from e
                hooks.reached("merge", index + 1)
            return output.rows

    def _rename_only_part(self, out: Path, overwrite: bool) -> int:
        """A one-window job: its committed part, written with OUT's schema and already fsynced, is OUT.

        Renaming it saves decoding and re-encoding every vector (half the write time of such a job).
        """
        part = self.path / part_name(0)
        try:
            rows = pq.ParquetFile(part).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"committed part {part} is unreadable ({e}); rerun with --restart") from e
        if out.exists() and not overwrite:
            raise OutputExistsError(f"output {out} appeared while the job ran; not replacing it")
        try:
            os.replace(part, out)
        except OSError as e:
            raise OutputError(f"finishing {out} failed: {e}") from e
        return rows

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _clear(self) -> None:
        for child in self.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
