"""Azure Blob Storage containers as a Store (az://container/path, abfs[s]://container@account.dfs.core.windows.net/path).

Everything goes through azure-storage-blob:
    - reads are ranged downloads behind a seekable file (a Parquet footer, then one row group at a time);
    - a small file is one Put Blob, a large one staged blocks committed by one Put Block List at the end:
      the blob is whole or absent (uncommitted blocks are invisible; a rerun deletes a killed job's);
    - versions are ETags, and the lease object's conditional writes are If-None-Match / If-Match.
Credentials: AZURE_STORAGE_CONNECTION_STRING (it may name the endpoint: Azurite, sovereign clouds), else
the account (from the URI or AZURE_STORAGE_ACCOUNT_NAME) with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN,
else azure-identity's DefaultAzureCredential (environment, workload and managed identity, az login).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import time
import uuid
from collections.abc import Iterator

import pyarrow as pa

from embedder.errors import EmbedderError, InputError, OutputError, OutputExistsError, UsageError
from embedder.io.store import ChunkedUpload, FileEntry, ObjectStore, RangedReader

_INSTALL = "pip install 'embedder[azure]'"
_BLOCK_BYTES = 8 << 20  # staged blocks; a blob holds up to 50,000 of them (about 390 GiB at this size)


def _sdk():
    try:
        import azure.core.exceptions as errors
        from azure.core import MatchConditions
        from azure.storage.blob import BlobServiceClient
    except ImportError:
        raise UsageError(f"az:// and abfs:// paths need azure-storage-blob, which is not installed: {_INSTALL}") \
            from None
    return BlobServiceClient, MatchConditions, errors


@functools.cache
def _service(account: str | None):
    """One client per account, from the standard Azure settings (see the module docstring)."""
    BlobServiceClient, _, _ = _sdk()
    options = {"retry_total": 8}
    connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if connection and (account is None or f"AccountName={account};" in connection + ";"):
        return BlobServiceClient.from_connection_string(connection, **options)
    account = account or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise UsageError("no Azure storage account: name it in the URI (abfs://container@ACCOUNT.dfs.core.windows.net/"
                         "...) or set AZURE_STORAGE_ACCOUNT_NAME or AZURE_STORAGE_CONNECTION_STRING")
    url = f"https://{account}.blob.core.windows.net"
    if os.environ.get("AZURE_STORAGE_KEY"):
        credential = {"account_name": account, "account_key": os.environ["AZURE_STORAGE_KEY"]}
    elif os.environ.get("AZURE_STORAGE_SAS_TOKEN"):
        credential = os.environ["AZURE_STORAGE_SAS_TOKEN"]
    else:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError:
            raise UsageError(f"no Azure key or SAS token is set and azure-identity is not installed: {_INSTALL}") \
                from None
        credential = DefaultAzureCredential()
    return BlobServiceClient(url, credential=credential, **options)


class AzureStore(ObjectStore):
    scheme = "az"

    def __init__(self, container: str, account: str | None = None):
        super().__init__(container)
        self.account = account

    @classmethod
    @functools.cache
    def for_container(cls, container: str, account: str | None) -> AzureStore:
        return cls(container, account)

    @functools.cached_property
    def container(self):
        return _service(self.account).get_container_client(self.bucket)

    def arrow_filesystem(self):
        """pyarrow's own Azure filesystem, set up from the same settings as the blob SDK's client."""
        from urllib.parse import urlparse

        from pyarrow import fs as pafs

        service = _service(self.account)
        account = service.account_name
        options: dict = {}
        connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if connection and service.credential is not None and hasattr(service.credential, "account_key"):
            options["account_key"] = service.credential.account_key
        elif os.environ.get("AZURE_STORAGE_KEY"):
            options["account_key"] = os.environ["AZURE_STORAGE_KEY"]
        elif os.environ.get("AZURE_STORAGE_SAS_TOKEN"):
            options["sas_token"] = os.environ["AZURE_STORAGE_SAS_TOKEN"]
        endpoint = urlparse(service.url)
        if endpoint.hostname != f"{account}.blob.core.windows.net":  # an emulator or another cloud
            options.update(blob_storage_authority=endpoint.netloc, blob_storage_scheme=endpoint.scheme,
                           dfs_storage_authority=endpoint.netloc, dfs_storage_scheme=endpoint.scheme)
        return pafs.AzureFileSystem(account, **options)

    def blob(self, path: str):
        return self.container.get_blob_client(self.key(path))

    def uri(self, path: str) -> str:
        if self.account:
            bucket, _, key = path.partition("/")
            return f"abfs://{bucket}@{self.account}.dfs.core.windows.net/{key}"
        return f"az://{path}"

    @contextlib.contextmanager
    def _explained(self, operation: str, path: str, missing: type[EmbedderError] = InputError) -> Iterator[None]:
        """The SDK's errors as one line naming the container and the operation, with the project's exit codes."""
        _, _, errors = _sdk()
        where = f"{operation} {self.uri(path)}"
        try:
            yield
        except errors.ResourceNotFoundError as e:
            if getattr(e, "error_code", None) == "ContainerNotFound":
                raise missing(f"container {self.bucket} does not exist ({where})") from None
            raise missing(f"{self.uri(path)} does not exist ({operation})") from None
        except errors.ClientAuthenticationError as e:
            code = getattr(e, "error_code", None) or "authentication failed"
            raise UsageError(f"access to container {self.bucket} denied ({where}: {code}); "
                             "check the Azure credentials and the container's permissions") from None
        except errors.HttpResponseError as e:
            if e.status_code == 403:
                raise UsageError(f"access to container {self.bucket} denied ({where}: {e.error_code}); check the Azure "
                                 "credentials and the container's permissions") from None
            raise OutputError(f"{where} failed after retries: {e.status_code} {e.error_code or e.reason}") from None
        except errors.AzureError as e:  # connection refused, timeouts: after the retries
            raise OutputError(f"{where} failed after retries: {type(e).__name__}: {str(e).splitlines()[0]}") from None

    # -- reading ----------------------------------------------------------------------------------------
    def entry(self, path: str) -> FileEntry | None:
        _, _, errors = _sdk()
        with self._explained("GetBlobProperties", path):
            try:
                props = self.blob(path).get_blob_properties()
            except errors.ResourceNotFoundError:
                return None
        return FileEntry(path, props.size, _etag(props.etag))

    def list_prefix(self, prefix: str, limit: int | None = None) -> list[FileEntry]:
        found: list[FileEntry] = []
        with self._explained("ListBlobs", f"{self.bucket}/{prefix}"):
            for blob in self.container.list_blobs(name_starts_with=prefix or None):
                found.append(FileEntry(f"{self.bucket}/{blob.name}", blob.size, _etag(blob.etag)))
                if limit and len(found) >= limit:
                    break
        return found

    def check_bucket(self, path: str, missing: type[EmbedderError] = InputError) -> None:
        with self._explained("GetContainerProperties", path, missing):
            self.container.get_container_properties()

    def open_input(self, path: str) -> pa.NativeFile:
        entry = self.entry(path)
        if entry is None:
            raise FileNotFoundError(f"{self.uri(path)} does not exist")
        client = self.blob(path)

        def fetch(offset: int, length: int) -> bytes:
            with self._explained("GetBlob", path):
                return client.download_blob(offset=offset, length=length).readall()

        return pa.PythonFile(RangedReader(fetch, entry.size), mode="r")

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        _, _, errors = _sdk()
        with self._explained("GetBlob", path, OutputError):
            try:
                download = self.blob(path).download_blob()
            except errors.ResourceNotFoundError:
                return None
            return download.readall(), download.properties.etag

    # -- writing ----------------------------------------------------------------------------------------
    def put_bytes(self, path: str, data: bytes) -> None:
        with self._explained("PutBlob", path, OutputError):
            self.blob(path).upload_blob(data, overwrite=True)

    def create_new(self, path: str, data: bytes) -> str | None:
        _, _, errors = _sdk()
        with self._explained("PutBlob", path, OutputError):
            try:
                return self.blob(path).upload_blob(data, overwrite=False)["etag"]
            except errors.ResourceExistsError:
                return None

    def replace_if(self, path: str, data: bytes, version: str) -> str | None:
        _, MatchConditions, errors = _sdk()
        with self._explained("PutBlob", path, OutputError):
            try:
                return self.blob(path).upload_blob(data, overwrite=True, etag=version,
                                                   match_condition=MatchConditions.IfNotModified)["etag"]
            except (errors.ResourceModifiedError, errors.ResourceNotFoundError):
                return None

    @contextlib.contextmanager
    def writer(self, path: str, overwrite: bool = True):
        upload = _BlockUpload(self, path)
        yield upload  # on an error nothing is committed: staged blocks stay invisible (a rerun deletes them)
        upload.commit(overwrite)

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy within the account; the destination appears when the copy succeeds."""
        target = self.blob(dst)
        with self._explained("CopyBlob", dst, OutputError):
            target.start_copy_from_url(self.blob(src).url)
            while (state := target.get_blob_properties().copy).status == "pending":
                time.sleep(0.2)
        if state.status != "success":
            raise OutputError(f"copying {self.uri(src)} to {self.uri(dst)} ended {state.status}: "
                              f"{state.status_description}")

    def delete(self, path: str) -> None:
        _, _, errors = _sdk()
        with self._explained("DeleteBlob", path, OutputError):
            with contextlib.suppress(errors.ResourceNotFoundError):
                self.blob(path).delete_blob()

    def check_writable(self, folder: str) -> None:
        self.check_bucket(folder, missing=UsageError)
        probe = self.join(folder, f".embedder-probe-{uuid.uuid4().hex[:12]}")
        with self._explained("PutBlob", probe, UsageError):
            self.blob(probe).upload_blob(b"", overwrite=True)
        self.delete(probe)

    def clear_strays(self, work: str, out: str) -> None:
        """Drop the blocks a killed job staged but never committed, under work and at out.

        No reader sees them, but they hold storage for up to 7 days, and Azurite counts them as a blob for
        If-None-Match. A name with staged blocks and no committed blob is deleted whole: nothing committed is lost.
        """
        _, _, errors = _sdk()
        names = {self.key(out)}
        with self._explained("ListBlobs", work, OutputError):
            prefix = self.key(work) + "/"
            committed = {b.name for b in self.container.list_blobs(name_starts_with=prefix)}
            staged = {b.name for b in self.container.list_blobs(name_starts_with=prefix, include=["uncommittedblobs"])}
        names |= staged - committed
        for name in names:
            path = f"{self.bucket}/{name}"
            if self.entry(path) is not None:
                continue
            with self._explained("DeleteBlob", path, OutputError), contextlib.suppress(errors.ResourceNotFoundError):
                self.container.get_blob_client(name).delete_blob()


def _etag(value: str) -> str:
    """Listings and properties quote ETags differently: compare them bare."""
    return value.strip('"')


class _BlockUpload(ChunkedUpload):
    """A write-only stream into one blob: one Put Blob if it stays small, else staged blocks committed at the end."""

    def __init__(self, store: AzureStore, path: str):
        super().__init__()
        self.store, self.path, self.client = store, path, store.blob(path)
        self.blocks: list[str] = []
        self.prefix = uuid.uuid4().hex[:16]  # block ids of one upload share a length, as Azure requires

    def chunk_bytes(self) -> int:
        return _BLOCK_BYTES

    def _send(self) -> None:
        block = base64.b64encode(f"{self.prefix}-{len(self.blocks):08d}".encode()).decode()
        with self.store._explained("PutBlock", self.path, OutputError):
            self.client.stage_block(block, bytes(self.buffer))
        self.blocks.append(block)
        self.buffer.clear()

    def commit(self, overwrite: bool) -> None:
        """Publish the blob; with overwrite=False, only if no blob appeared at the path (If-None-Match: *)."""
        _, _, errors = _sdk()
        with self.store._explained("PutBlockList" if self.blocks else "PutBlob", self.path, OutputError):
            try:
                self._publish(conditional=not overwrite)
            except (errors.ResourceExistsError, errors.ResourceModifiedError):
                # Blocks a killed writer staged at this name make a blob "exist" for the condition (Azurite)
                # though no reader sees one: only a committed blob is someone else's output.
                if self.store.entry(self.path) is not None:
                    raise OutputExistsError(f"output {self.store.uri(self.path)} appeared while the job ran; not "
                                            "replacing it") from None
                self._publish(conditional=False)

    def _publish(self, conditional: bool) -> None:
        from azure.storage.blob import BlobBlock

        _, MatchConditions, _ = _sdk()
        if not self.blocks:
            self.client.upload_blob(bytes(self.buffer), overwrite=not conditional)
            return
        if self.buffer:
            self._send()
        condition = {"etag": "*", "match_condition": MatchConditions.IfMissing} if conditional else {}
        self.client.commit_block_list([BlobBlock(block_id=b) for b in self.blocks], **condition)
