"""S3 and S3-compatible stores (MinIO, Ceph, R2) as a Store.

Reads go through pyarrow's S3 filesystem (ranged GETs: a row group at a time, never a whole file first);
everything that carries a guarantee goes through boto3, because pyarrow's S3 streams expose no ETag and
no conditional write, and complete a multipart upload on close even after an error (apache/arrow#40502):
    - a small file is one PUT, a large one one multipart upload completed last: OUT is whole or absent;
    - versions are ETags, so an input rewritten between a crash and the rerun is detected;
    - the lock is a lease object created with a conditional PUT (embedder/io/lease.py).
Both clients take the standard AWS chain for credentials. The endpoint is the one boto3 resolves
(AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, or endpoint_url in the config file) and is handed to pyarrow,
which would otherwise ignore the config file's endpoint_url (apache/arrow#44119).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pyarrow as pa

from embedder.errors import EmbedderError, InputError, OutputError, OutputExistsError, UsageError
from embedder.io.store import ChunkedUpload, FileEntry, ObjectStore

logger = logging.getLogger(__name__)

_INSTALL = "pip install 'embedder[s3]'"
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
           "AllAccessDisabled", "AccountProblem", "403"}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_PART_BYTES = 8 << 20  # S3 parts are at least 5 MiB (but the last); the size grows every 1,000 parts


def _boto():
    try:
        import boto3
        import botocore
        from botocore.config import Config
    except ImportError:
        raise UsageError(f"s3:// paths need boto3, which is not installed: {_INSTALL}") from None
    return boto3, botocore, Config


@functools.cache
def _client():
    boto3, _, Config = _boto()
    # Standard retries with backoff: a transient failure is retried before it becomes exit 1.
    return boto3.session.Session().client("s3", config=Config(retries={"max_attempts": 8, "mode": "standard"}))


class S3Store(ObjectStore):
    scheme = "s3"

    @classmethod
    @functools.cache
    def for_bucket(cls, bucket: str) -> S3Store:
        return cls(bucket)

    @property
    def client(self):
        return _client()

    @functools.cached_property
    def fs(self):
        from pyarrow import fs as pafs

        endpoint = self.client.meta.endpoint_url
        region = self.client.meta.region_name or "us-east-1"
        parsed = urlparse(endpoint)
        options = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=8)}
        if not (parsed.hostname or "").endswith("amazonaws.com"):  # MinIO, Ceph, R2, a test server
            options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https", region=region)
        else:
            with contextlib.suppress(OSError):
                region = pafs.resolve_s3_region(self.bucket)
            options["region"] = region
        return pafs.S3FileSystem(**options)

    def arrow_filesystem(self):
        return self.fs

    # -- names ------------------------------------------------------------------------------------------
    def uri(self, path: str) -> str:
        return f"s3://{path}"

    @contextlib.contextmanager
    def _explained(self, operation: str, path: str, missing: type[EmbedderError] = InputError) -> Iterator[None]:
        """boto3's errors as one line naming the bucket and the operation, with the project's exit codes."""
        _, botocore, _ = _boto()
        try:
            yield
        except botocore.exceptions.ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            where = f"{operation} {self.uri(path)}"
            if code == "NoSuchBucket":
                raise missing(f"bucket {self.bucket} does not exist ({where})") from None
            if code in _MISSING_KEY:
                raise missing(f"{self.uri(path)} does not exist ({operation})") from None
            if code in _DENIED:
                raise UsageError(f"access to bucket {self.bucket} denied ({where}: {code}); check the AWS "
                                 "credentials and the bucket policy") from None
            raise OutputError(f"{where} failed after retries: {code} {error.get('Message', '')}".strip()) from None
        except botocore.exceptions.NoCredentialsError:
            raise UsageError(f"no AWS credentials for {self.uri(path)}: set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an instance role applies") from None
        except botocore.exceptions.BotoCoreError as e:  # connection refused, timeouts: after the retries
            raise OutputError(f"{operation} {self.uri(path)} failed after retries: {e}") from None

    @staticmethod
    def _code(error: Exception) -> str:
        return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))

    # -- reading ----------------------------------------------------------------------------------------
    def entry(self, path: str) -> FileEntry | None:
        _, botocore, _ = _boto()
        with self._explained("HeadObject", path):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.key(path))
            except botocore.exceptions.ClientError as e:
                if self._code(e) in _MISSING_KEY:
                    return None
                raise
        return FileEntry(path, head["ContentLength"], head["ETag"])

    def list_prefix(self, prefix: str, limit: int | None = None) -> list[FileEntry]:
        path = f"{self.bucket}/{prefix}"
        found: list[FileEntry] = []
        with self._explained("ListObjectsV2", path):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix, PaginationConfig={"MaxItems": limit} if limit else {}):
                found += [FileEntry(f"{self.bucket}/{o['Key']}", o["Size"], o["ETag"])
                          for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return found

    def check_bucket(self, path: str, missing: type[EmbedderError] = InputError) -> None:
        """Say which of bucket and access is the problem, where a listing found nothing."""
        with self._explained("HeadBucket", path, missing):
            self.client.head_bucket(Bucket=self.bucket)

    def open_input(self, path: str) -> pa.NativeFile:
        return self.fs.open_input_file(path)

    # -- writing ----------------------------------------------------------------------------------------
    def put_bytes(self, path: str, data: bytes) -> None:
        with self._explained("PutObject", path, OutputError):
            self.client.put_object(Bucket=self.bucket, Key=self.key(path), Body=data)

    @contextlib.contextmanager
    def writer(self, path: str, overwrite: bool = True):
        upload = _Upload(self, path)
        try:
            yield upload
        except BaseException:
            upload.abort()
            raise
        upload.complete(overwrite)

    def copy(self, src: str, dst: str) -> None:
        with self._explained("CopyObject", dst, OutputError):
            # Server-side; boto3's managed copy switches to a multipart copy above 5 GB (one CopyObject's limit).
            self.client.copy({"Bucket": self.bucket, "Key": self.key(src)}, self.bucket, self.key(dst))

    def delete(self, path: str) -> None:
        with self._explained("DeleteObject", path, OutputError):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(path))

    def delete_folder(self, path: str) -> None:
        keys = [self.key(e.path) for e in self.list_files(path)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys a call
            with self._explained("DeleteObjects", path, OutputError):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})

    def check_writable(self, folder: str) -> None:
        self.check_bucket(folder, missing=UsageError)
        probe = self.join(folder, f".embedder-probe-{uuid.uuid4().hex[:12]}")
        with self._explained("PutObject", probe, UsageError):
            self.client.put_object(Bucket=self.bucket, Key=self.key(probe), Body=b"")
        self.delete(probe)

    # -- the lease's conditional writes ---------------------------------------------------------------
    def create_new(self, path: str, data: bytes) -> str | None:
        return self._conditional_put(path, data, IfNoneMatch="*")

    def replace_if(self, path: str, data: bytes, version: str) -> str | None:
        return self._conditional_put(path, data, IfMatch=version)

    def _conditional_put(self, path: str, data: bytes, **condition) -> str | None:
        _, botocore, _ = _boto()
        with self._explained("PutObject", path, OutputError):
            try:
                return self.client.put_object(Bucket=self.bucket, Key=self.key(path), Body=data, **condition)["ETag"]
            except botocore.exceptions.ClientError as e:
                # 409: a concurrent conditional write to the same key is in flight; it is the other job's.
                if self._code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    return None
                raise

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        _, botocore, _ = _boto()
        with self._explained("GetObject", path, OutputError):
            try:
                got = self.client.get_object(Bucket=self.bucket, Key=self.key(path))
            except botocore.exceptions.ClientError as e:
                if self._code(e) in _MISSING_KEY:
                    return None
                raise
            return got["Body"].read(), got["ETag"]

    def clear_strays(self, work: str, out: str) -> None:
        """Abort the multipart uploads a killed job left open under work and at out (they cost storage)."""
        for prefix in (self.key(work) + "/", self.key(out)):
            with self._explained("ListMultipartUploads", self.join(self.bucket, prefix), OutputError):
                pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
                uploads = [u for page in pages for u in page.get("Uploads", [])]
            for upload in uploads:
                key = upload["Key"]
                if key.startswith(self.key(work) + "/") or key == self.key(out) or key.startswith(self.key(out) + "/"):
                    logger.info("aborting the upload of s3://%s/%s left by a killed run", self.bucket, key)
                    with self._explained("AbortMultipartUpload", f"{self.bucket}/{key}", OutputError):
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"])


class _Upload(ChunkedUpload):
    """A write-only stream into one object: a single PUT if it stays small, else one multipart upload.

    Nothing is visible at the key until complete(); abort() (on any error) discards the uploaded parts.
    """

    def __init__(self, store: S3Store, path: str):
        super().__init__()
        self.store, self.path, self.key = store, path, store.key(path)
        self.upload_id: str | None = None
        self.parts: list[dict] = []

    def chunk_bytes(self) -> int:
        return _PART_BYTES * (1 + len(self.parts) // 1000)  # 10,000 parts reach about 430 GiB

    def _send(self) -> None:
        client = self.store.client
        with self.store._explained("UploadPart", self.path, OutputError):
            if self.upload_id is None:
                self.upload_id = client.create_multipart_upload(Bucket=self.store.bucket, Key=self.key)["UploadId"]
            number = len(self.parts) + 1
            etag = client.upload_part(Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                                      PartNumber=number, Body=bytes(self.buffer))["ETag"]
        self.parts.append({"ETag": etag, "PartNumber": number})
        self.buffer.clear()

    def complete(self, overwrite: bool) -> None:
        """Publish the object; with overwrite=False, only if nothing appeared at the key (If-None-Match)."""
        _, botocore, _ = _boto()
        condition = {} if overwrite else {"IfNoneMatch": "*"}
        try:
            with self.store._explained("CompleteMultipartUpload" if self.upload_id else "PutObject", self.path,
                                       OutputError):
                try:
                    if self.upload_id is None:
                        self.store.client.put_object(Bucket=self.store.bucket, Key=self.key, Body=bytes(self.buffer),
                                                     **condition)
                    else:
                        if self.buffer:
                            self._send()
                        self.store.client.complete_multipart_upload(
                            Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                            MultipartUpload={"Parts": self.parts}, **condition)
                except botocore.exceptions.ClientError as e:
                    if S3Store._code(e) in ("PreconditionFailed", "ConditionalRequestConflict"):
                        raise OutputExistsError(f"output {self.store.uri(self.path)} appeared while the job ran; "
                                                "not replacing it") from None
                    raise
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.upload_id is not None:
            with contextlib.suppress(Exception):  # best effort: a rerun aborts what is left (clear_strays)
                self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                                         UploadId=self.upload_id)
            self.upload_id = None
        self.buffer.clear()

