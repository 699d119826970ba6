"""The local disk as a Store: atomic by temporary name, fsync and rename; locked by flock."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow as pa

from embedder.errors import EmbedderError, LockedError, OutputError, OutputExistsError, UsageError
from embedder.io.atomic import fsync_path, write_bytes_atomic
from embedder.io.store import FileEntry, Store


class LocalStore(Store):
    scheme = ""

    @staticmethod
    def absolute(spec: str) -> str:
        return os.path.abspath(os.path.expanduser(spec)) if spec else os.getcwd()

    def uri(self, path: str) -> str:
        return path

    def entry(self, path: str) -> FileEntry | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        if not os.path.isfile(path):
            return None
        return FileEntry(path, stat.st_size, f"{stat.st_size}:{stat.st_mtime_ns}")

    def is_folder(self, path: str) -> bool:
        return os.path.isdir(path)

    def list_files(self, folder: str) -> list[FileEntry]:
        found = []
        for root, _dirs, files in os.walk(folder):
            found += [e for e in (self.entry(os.path.join(root, f)) for f in files) if e is not None]
        return found

    def glob(self, pattern: str) -> list[FileEntry]:
        entries = (self.entry(p) for p in glob.glob(pattern, recursive=True))
        return [e for e in entries if e is not None]

    def open_input(self, path: str) -> pa.NativeFile:
        return pa.OSFile(path, "rb")

    def read_bytes(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def put_bytes(self, path: str, data: bytes) -> None:
        write_bytes_atomic(Path(path), data)

    @contextlib.contextmanager
    def writer(self, path: str, overwrite: bool = True):
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)  # as in a bucket, a path needs no folder made first
                sink = open(tmp, "wb")  # noqa: SIM115 (closed by the with below)
            except OSError as e:
                raise OutputError(f"cannot create {tmp}: {e}") from e
            with sink:
                yield sink
            fsync_path(Path(tmp))
            if os.path.exists(path) and not overwrite:
                raise OutputExistsError(f"output {path} appeared while the job ran; not replacing it")
            os.replace(tmp, path)
        except EmbedderError:
            raise
        except OSError as e:
            raise OutputError(f"writing {path} failed: {e}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def move(self, src: str, dst: str, overwrite: bool = True) -> None:
        try:
            old = None
            if os.path.lexists(dst):
                if not overwrite:
                    raise OutputExistsError(f"output {dst} appeared while the job ran; not replacing it")
                if os.path.isdir(dst) and not os.path.islink(dst):  # a folder cannot be replaced in one rename
                    old = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.old-{uuid.uuid4().hex[:12]}")
                    os.replace(dst, old)
            os.replace(src, dst)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except EmbedderError:
            raise
        except OSError as e:
            raise OutputError(f"finishing {dst} failed: {e}") from e

    def copy(self, src: str, dst: str) -> None:
        with self.writer(dst) as sink, pa.OSFile(src, "rb") as source:
            while chunk := source.read(1 << 24):
                sink.write(chunk)

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def delete_folder(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def check_writable(self, folder: str) -> None:
        if not os.path.isdir(folder):
            raise UsageError(f"output folder {folder} does not exist")
        # Probe with a real file: permission bits say nothing for root or read-only mounts.
        try:
            fd, probe = tempfile.mkstemp(prefix=".embedder.", suffix=".probe", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"output folder {folder} is not writable: {e.strerror}") from e

    @contextlib.contextmanager
    def lock(self, work: str, out_uri: str, take_over: bool):
        # flock is released by the kernel when the holder dies, so a dead job never blocks: take_over is moot.
        try:
            os.makedirs(work, exist_ok=True)
            fd = os.open(work, os.O_RDONLY)
        except OSError as e:
            raise OutputError(f"cannot create work folder {work}: {e}") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LockedError(f"another job is writing {out_uri} (its work folder {work} is locked)") from None
            yield lambda: None  # a lock the kernel holds cannot be lost
        finally:
            os.close(fd)

    def clear_strays(self, work: str, out: str) -> None:
        # Temporary files of a killed run (a part being written, a final write); the caller holds the lock.
        strays = glob.glob(os.path.join(glob.escape(work), "**", ".*.tmp"), recursive=True)
        beside = f".{glob.escape(os.path.basename(out))}.*.tmp"
        strays += glob.glob(os.path.join(glob.escape(os.path.dirname(out)), beside))
        for stray in strays:
            self.delete(stray)
