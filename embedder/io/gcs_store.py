"""Google Cloud Storage buckets as a Store (gs://bucket/path).

Everything goes through google-cloud-storage:
    - reads are ranged downloads of one generation behind a seekable file (a Parquet footer, then one row
      group at a time), so a file replaced while it is read is never mixed with its successor;
    - a small file is one upload; a large one is uploaded in chunks as temporary objects beside it and
      composed into it at the end (compose publishes atomically), the chunks deleted after. The library's
      own write stream is not used: like pyarrow's S3 stream, it finalizes its upload on close even after an
      error. A rerun deletes the chunks a killed job left;
    - versions are generations, and the lease object's conditional writes are ifGenerationMatch (0: create).
Credentials: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default
login`, the metadata server of GCE, GKE, Cloud Run); STORAGE_EMULATOR_HOST points the client at an emulator.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Iterator

import pyarrow as pa

from embedder.errors import EmbedderError, InputError, OutputError, OutputExistsError, UsageError
from embedder.io.store import ChunkedUpload, FileEntry, ObjectStore, RangedReader

_INSTALL = "pip install 'embedder[gcs]'"
_CHUNK_BYTES = 32 << 20  # uploaded as one object each, composed 32 at a time
_COMPOSE_LIMIT = 32  # sources per compose call, GCS's limit
_CHUNKS = ".upload-"  # the temporary chunks of `name` live under `.name.upload-<id>/`


def _sdk():
    try:
        from google.api_core import exceptions
        from google.cloud import storage
    except ImportError:
        raise UsageError(f"gs:// paths need google-cloud-storage, which is not installed: {_INSTALL}") from None
    return storage, exceptions


@functools.cache
def _client():
    storage, _ = _sdk()
    from google.auth.exceptions import DefaultCredentialsError

    try:
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulated"),
                                  credentials=AnonymousCredentials())
        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))
    except DefaultCredentialsError:
        raise UsageError("no Google Cloud credentials for gs:// paths: set GOOGLE_APPLICATION_CREDENTIALS, run "
                         "`gcloud auth application-default login`, or run where a service account applies") from None


class GCSStore(ObjectStore):
    scheme = "gs"

    @classmethod
    @functools.cache
    def for_bucket(cls, bucket: str) -> GCSStore:
        return cls(bucket)

    @property
    def client(self):
        return _client()

    @functools.cached_property
    def gcs_bucket(self):
        return self.client.bucket(self.bucket)

    def blob(self, path: str, generation: int | None = None):
        return self.gcs_bucket.blob(self.key(path), generation=generation)

    def uri(self, path: str) -> str:
        return f"gs://{path}"

    def arrow_filesystem(self):
        from pyarrow import fs as pafs

        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            scheme, _, host = emulator.rpartition("://")
            return pafs.GcsFileSystem(anonymous=True, endpoint_override=host, scheme=scheme or "http")
        return pafs.GcsFileSystem()

    @contextlib.contextmanager
    def _explained(self, operation: str, path: str, missing: type[EmbedderError] = InputError) -> Iterator[None]:
        """The client's errors as one line naming the bucket and the operation, with the project's exit codes."""
        _, exceptions = _sdk()
        from google.auth.exceptions import GoogleAuthError

        where = f"{operation} {self.uri(path)}"
        try:
            yield
        except exceptions.NotFound:
            if not self._bucket_exists():
                raise missing(f"bucket {self.bucket} does not exist ({where})") from None
            raise missing(f"{self.uri(path)} does not exist ({operation})") from None
        except (exceptions.Forbidden, exceptions.Unauthorized) as e:
            raise UsageError(f"access to bucket {self.bucket} denied ({where}: {e.code}); check the Google Cloud "
                             "credentials and the bucket's permissions") from None
        except GoogleAuthError as e:
            raise UsageError(f"access to bucket {self.bucket} denied ({where}: {type(e).__name__})") from None
        except exceptions.GoogleAPIError as e:  # after the library's retries
            raise OutputError(f"{where} failed after retries: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        except (ConnectionError, OSError) as e:
            if isinstance(e, EmbedderError):
                raise
            raise OutputError(f"{where} failed after retries: {type(e).__name__}: {e}") from None

    def _bucket_exists(self) -> bool:
        try:
            return self.gcs_bucket.exists()
        except Exception:  # noqa: BLE001 (only to word an error that is raised anyway)
            return True

    # -- reading ----------------------------------------------------------------------------------------
    def entry(self, path: str) -> FileEntry | None:
        with self._explained("GetObject", path):
            blob = self.gcs_bucket.get_blob(self.key(path))
        return None if blob is None else FileEntry(path, blob.size, str(blob.generation))

    def list_prefix(self, prefix: str, limit: int | None = None) -> list[FileEntry]:
        with self._explained("ListObjects", f"{self.bucket}/{prefix}"):
            return [FileEntry(f"{self.bucket}/{b.name}", b.size, str(b.generation))
                    for b in self.client.list_blobs(self.bucket, prefix=prefix or None, max_results=limit)]

    def check_bucket(self, path: str, missing: type[EmbedderError] = InputError) -> None:
        with self._explained("GetBucket", path, missing):
            if not self.gcs_bucket.exists():
                raise missing(f"bucket {self.bucket} does not exist (GetBucket {self.uri(path)})")

    def open_input(self, path: str) -> pa.NativeFile:
        entry = self.entry(path)
        if entry is None:
            raise FileNotFoundError(f"{self.uri(path)} does not exist")
        blob = self.blob(path, generation=int(entry.version))  # every range from the generation that was listed

        def fetch(offset: int, length: int) -> bytes:
            with self._explained("GetObject", path):
                return blob.download_as_bytes(start=offset, end=offset + length - 1, checksum=None)

        return pa.PythonFile(RangedReader(fetch, entry.size), mode="r")

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        _, exceptions = _sdk()
        with self._explained("GetObject", path, OutputError):
            for _ in range(5):
                blob = self.gcs_bucket.get_blob(self.key(path))
                if blob is None:
                    return None
                try:
                    return blob.download_as_bytes(if_generation_match=blob.generation), str(blob.generation)
                except (exceptions.PreconditionFailed, exceptions.NotFound):
                    continue  # replaced between the two calls: read the new one
        raise OutputError(f"{self.uri(path)} keeps changing while it is read")

    # -- writing ----------------------------------------------------------------------------------------
    def put_bytes(self, path: str, data: bytes) -> None:
        with self._explained("InsertObject", path, OutputError):
            self.blob(path).upload_from_string(data)

    def create_new(self, path: str, data: bytes) -> str | None:
        return self._conditional_upload(path, data, 0)

    def replace_if(self, path: str, data: bytes, version: str) -> str | None:
        return self._conditional_upload(path, data, int(version))

    def _conditional_upload(self, path: str, data: bytes, generation: int) -> str | None:
        _, exceptions = _sdk()
        blob = self.blob(path)
        with self._explained("InsertObject", path, OutputError):
            try:
                blob.upload_from_string(data, if_generation_match=generation)
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                return None
        return str(blob.generation)

    @contextlib.contextmanager
    def writer(self, path: str, overwrite: bool = True):
        upload = _ComposedUpload(self, path)
        try:
            yield upload
            upload.publish(overwrite)
        finally:
            upload.discard_chunks()

    def copy(self, src: str, dst: str) -> None:
        with self._explained("RewriteObject", dst, OutputError):
            # Server-side; rewrite continues across calls for large objects, and the copy appears when done.
            target, token = self.blob(dst), None
            while True:
                token, _done, _total = target.rewrite(self.blob(src), token=token)
                if token is None:
                    break

    def delete(self, path: str) -> None:
        _, exceptions = _sdk()
        with self._explained("DeleteObject", path, OutputError), contextlib.suppress(exceptions.NotFound):
            self.blob(path).delete()

    def check_writable(self, folder: str) -> None:
        self.check_bucket(folder, missing=UsageError)
        probe = self.join(folder, f".embedder-probe-{uuid.uuid4().hex[:12]}")
        with self._explained("InsertObject", probe, UsageError):
            self.blob(probe).upload_from_string(b"")
        self.delete(probe)

    def clear_strays(self, work: str, out: str) -> None:
        """Delete the chunks of uploads a killed job left, under work and beside out (no reader lists them)."""
        for entry in [*self.list_files(work), *self.list_prefix(self.key(_chunk_folder(out, "")))]:
            if _CHUNKS in entry.path:
                self.delete(entry.path)


def _chunk_folder(path: str, upload_id: str) -> str:
    """Where the chunks of an upload to path wait: a hidden folder beside it, named after it."""
    parent, _, name = path.rpartition("/")
    return f"{parent}/.{name}{_CHUNKS}{upload_id}"


class _ComposedUpload(ChunkedUpload):
    """A write-only stream into one object: one upload if it stays small, else chunk objects composed at the end."""

    def __init__(self, store: GCSStore, path: str):
        super().__init__()
        self.store, self.path = store, path
        self.folder = _chunk_folder(path, uuid.uuid4().hex[:12])
        self.chunks: list[str] = []

    def chunk_bytes(self) -> int:
        return _CHUNK_BYTES

    def _send(self) -> None:
        chunk = f"{self.folder}/{len(self.chunks):06d}"
        self.store.put_bytes(chunk, bytes(self.buffer))
        self.chunks.append(chunk)
        self.buffer.clear()

    def publish(self, overwrite: bool) -> None:
        """Make the object appear whole; with overwrite=False, only if none appeared meanwhile (ifGenerationMatch=0)."""
        _, exceptions = _sdk()
        condition = None if overwrite else 0
        target = self.store.blob(self.path)
        with self.store._explained("ComposeObject" if self.chunks else "InsertObject", self.path, OutputError):
            try:
                if not self.chunks:
                    target.upload_from_string(bytes(self.buffer), if_generation_match=condition)
                    return
                if self.buffer:
                    self._send()
                sources = [self.store.blob(c) for c in self.chunks]
                level = 0
                while len(sources) > _COMPOSE_LIMIT:  # a tree of composes, 32 sources each
                    merged = []
                    for start in range(0, len(sources), _COMPOSE_LIMIT):
                        step = self.store.blob(f"{self.folder}/compose-{level}-{start:06d}")
                        step.compose(sources[start:start + _COMPOSE_LIMIT])
                        merged.append(step)
                    sources, level = merged, level + 1
                target.compose(sources, if_generation_match=condition)
            except exceptions.PreconditionFailed:
                raise OutputExistsError(f"output {self.store.uri(self.path)} appeared while the job ran; not "
                                        "replacing it") from None

    def discard_chunks(self) -> None:
        if self.chunks:
            with contextlib.suppress(EmbedderError):  # best effort: a rerun deletes what is left (clear_strays)
                self.store.delete_folder(self.folder)
