"""Where inputs and outputs live: a local disk or an object store, behind one small interface.

A Store names its files by a path string: an absolute POSIX path on disk, "bucket/key" in a bucket.
The run loop and the work folder use only the operations below, each of which keeps a guarantee that
the job relies on (a write appears complete or not at all; a lock excludes a second job), built from
what the medium really offers: rename and flock on disk, single PUTs, completed multipart uploads and
conditional writes in a bucket.

    locate("s3://bucket/prefix/")  -> (S3Store, "bucket/prefix")
    locate("corpus/")              -> (LocalStore, "/abs/corpus")
"""

from __future__ import annotations

import io
import posixpath
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa

from embedder.errors import OutputExistsError, UsageError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class FileEntry:
    """One file: its store path, size, and a version that changes whenever its bytes may have."""

    path: str
    size: int
    version: str  # size and mtime on disk; the ETag in a bucket


class Store(ABC):
    """The operations the job needs of a place that holds files."""

    scheme: str = ""

    @abstractmethod
    def uri(self, path: str) -> str:
        """How messages, metadata and fingerprints name path."""

    @abstractmethod
    def entry(self, path: str) -> FileEntry | None:
        """The file at path, or None where there is no file (a folder is not a file)."""

    @abstractmethod
    def is_folder(self, path: str) -> bool:
        """A folder on disk; a prefix holding at least one object in a bucket."""

    @abstractmethod
    def list_files(self, folder: str) -> list[FileEntry]:
        """Every file under folder, recursively, in any order."""

    @abstractmethod
    def glob(self, pattern: str) -> list[FileEntry]:
        """Files matching a glob (* and ? stay within one folder level, ** crosses levels), in any order."""

    @abstractmethod
    def open_input(self, path: str) -> pa.NativeFile:
        """A random-access reader: Parquet footers and row groups are read by range, never the whole file first."""

    @abstractmethod
    def read_bytes(self, path: str) -> bytes | None:
        """A small file's bytes, or None if it does not exist."""

    @abstractmethod
    def put_bytes(self, path: str, data: bytes) -> None:
        """Replace path with data atomically."""

    @abstractmethod
    def writer(self, path: str, overwrite: bool = True) -> AbstractContextManager[BinaryIO]:
        """A stream that appears at path, complete, only when the block exits without an error.

        overwrite=False: refuse (OutputExistsError) if something appeared at path meanwhile.
        """

    @abstractmethod
    def move(self, src: str, dst: str, overwrite: bool = True) -> None:
        """Publish src at dst (rename on disk, server-side copy then delete in a bucket)."""

    @abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Copy a file, replacing dst (server-side in a bucket); dst appears complete or not at all."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove a file; a missing one is not an error."""

    @abstractmethod
    def delete_folder(self, path: str) -> None:
        """Remove a folder and all it holds; a missing one is not an error."""

    @abstractmethod
    def check_writable(self, folder: str) -> None:
        """Raise UsageError, before any work, where files cannot be created in folder."""

    @abstractmethod
    def lock(self, work: str, out_uri: str, take_over: bool) -> AbstractContextManager[Callable[[], None]]:
        """Exclude every other job from the work folder `work` while the block runs (LockedError at once).

        Yields check(), which raises LockedError if the lock was lost meanwhile (a lease can be): call it
        before each write.

        take_over: the caller was told to discard an earlier run's progress (--restart) and may take a lock
        that a dead job left behind, where the store cannot tell a dead holder from a live one.
        """

    @abstractmethod
    def clear_strays(self, work: str, out: str) -> None:
        """Remove what a killed job left half-written under work and at out (temporary files, open uploads)."""

    def arrow_filesystem(self):
        """A pyarrow filesystem that reads this store's paths, for readers that take one (Ray Data); None on disk."""
        return None

    @staticmethod
    def join(*parts: str) -> str:
        return posixpath.join(*parts)

    @staticmethod
    def parent(path: str) -> str:
        return posixpath.dirname(path.rstrip("/"))

    @staticmethod
    def name(path: str) -> str:
        return posixpath.basename(path.rstrip("/"))


class ChunkedUpload:
    """The write side of the file protocol that pyarrow's writers use, cut into chunks for an object store.

    A subclass sends each full chunk (_send, which empties self.buffer) and publishes or discards the whole
    at the end; close() publishes nothing, because a writer that failed half-way closes its stream too.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.written = 0
        self.closed = False

    def chunk_bytes(self) -> int:
        raise NotImplementedError

    def _send(self) -> None:
        raise NotImplementedError

    def write(self, data) -> int:
        self.buffer += data
        self.written += len(data)
        if len(self.buffer) >= self.chunk_bytes():
            self._send()
        return len(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class RangedReader(io.RawIOBase):
    """A seekable, read-only file over an object that fetches only the ranges read: fetch(offset, length)."""

    def __init__(self, fetch: Callable[[int, int], bytes], size: int):
        self.fetch, self.size, self.position = fetch, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self.position + size)
        if end <= self.position:
            return b""
        data = self.fetch(self.position, end - self.position)
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def scheme_of(spec: str) -> str:
    """The URI scheme ("s3", "file"), or "" for a plain path."""
    match = _SCHEME.match(spec)
    return match.group(1).lower() if match else ""


def locate(spec: str) -> tuple[Store, str]:
    """The store that holds spec and spec's path in it (a trailing '/' is dropped: callers read it from spec)."""
    scheme = scheme_of(spec)
    if scheme in ("", "file"):
        from embedder.io.local_store import LocalStore

        return LocalStore(), LocalStore.absolute(spec[len("file://"):] if scheme else spec)
    if scheme in ("s3", "s3a"):
        from embedder.io.s3_store import S3Store

        rest = spec.split("://", 1)[1]
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise UsageError(f"{spec}: no bucket name")
        return S3Store.for_bucket(bucket), rest.rstrip("/") or bucket
    if scheme in ("az", "abfs", "abfss"):
        from embedder.io.azure_store import AzureStore

        rest = spec.split("://", 1)[1]
        container, _, key = rest.partition("/")
        container, _, host = container.partition("@")  # abfs://container@account.dfs.core.windows.net/...
        if not container:
            raise UsageError(f"{spec}: no container name")
        path = f"{container}/{key}".rstrip("/") if key.strip("/") else container
        return AzureStore.for_container(container, host.split(".", 1)[0] or None), path
    if scheme in ("gs", "gcs"):
        from embedder.io.gcs_store import GCSStore

        rest = spec.split("://", 1)[1]
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise UsageError(f"{spec}: no bucket name")
        return GCSStore.for_bucket(bucket), rest.rstrip("/") or bucket
    raise UsageError(f"{spec}: unknown storage scheme '{scheme}://'; use a local path, file://, s3://, gs:// or az://")


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regex over '/'-separated paths: * and ? within one level, ** across levels, [..] sets."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard (where listing can start)."""
    match = re.search(r"[*?\[]", pattern)
    return pattern if match is None else pattern[:match.start()]


def in_byte_order(entries: list[FileEntry]) -> list[FileEntry]:
    """Entries in the byte order of their paths: one order on every store (a local folder and its copy in a
    bucket list the same relative paths, and a shared prefix does not change the order of the rest)."""
    return sorted(entries, key=lambda e: e.path.encode("utf-8", "surrogateescape"))


class ObjectStore(Store):
    """A bucket (S3, GCS, Azure container): paths are "bucket/key", folders are key prefixes.

    Subclasses give listing and three conditional writes; the lock (a lease object, io/lease.py), globbing
    and folder listing are built here from them.
    """

    def __init__(self, bucket: str):
        self.bucket = bucket

    def key(self, path: str) -> str:
        bucket, _, key = path.partition("/")
        if bucket != self.bucket:
            raise ValueError(f"{path} is not in bucket {self.bucket}")
        return key

    def folder_prefix(self, path: str) -> str:
        key = self.key(path) if "/" in path else ""
        return f"{key.rstrip('/')}/" if key else ""

    @abstractmethod
    def list_prefix(self, prefix: str, limit: int | None = None) -> list[FileEntry]:
        """Objects whose key starts with prefix (no delimiter: every level below)."""

    @abstractmethod
    def create_new(self, path: str, data: bytes) -> str | None:
        """Create the object only if none exists; its version, or None if one existed."""

    @abstractmethod
    def replace_if(self, path: str, data: bytes, version: str) -> str | None:
        """Replace the object only if it is still at version; the new version, or None if it was not."""

    @abstractmethod
    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes and version, or None if it does not exist."""

    @abstractmethod
    def check_bucket(self, path: str, missing: type[Exception]) -> None:
        """Raise `missing` naming the bucket if it does not exist, UsageError if access is denied."""

    def read_bytes(self, path: str) -> bytes | None:
        found = self.read_versioned(path)
        return None if found is None else found[0]

    def is_folder(self, path: str) -> bool:
        return bool(self.list_prefix(self.folder_prefix(path), limit=1))

    def list_files(self, folder: str) -> list[FileEntry]:
        return self.list_prefix(self.folder_prefix(folder))

    def glob(self, pattern: str) -> list[FileEntry]:
        matches = glob_regex(pattern).match
        return [e for e in self.list_prefix(self.key(literal_prefix(pattern))) if matches(e.path)]

    def move(self, src: str, dst: str, overwrite: bool = True) -> None:
        """A bucket has no rename: a server-side copy, then the source deleted."""
        if not overwrite and self.entry(dst) is not None:
            raise OutputExistsError(f"output {self.uri(dst)} appeared while the job ran; not replacing it")
        self.copy(src, dst)
        self.delete(src)

    def delete_folder(self, path: str) -> None:
        for entry in self.list_files(path):
            self.delete(entry.path)

    def lock(self, work: str, out_uri: str, take_over: bool):
        from embedder.io.lease import Lease

        return Lease(self, self.join(work, "_lease"), out_uri, take_over)
