"""The test-side view of a bucket on a real test server, through the vendor's own client (not the job's code).

    S3Bucket     moto's S3 server (tests/s3_server.py), boto3
    AzureBucket  Azurite (tests/azurite_server.py), azure-storage-blob
    GCSBucket    fake-gcs-server (tests/gcs_server.py), google-cloud-storage

Each says how the job names it (uri), what its errors call it (word), and how to put, get and list objects,
so one test module checks every store's guarantees the same way.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

NAME = "corpus-bucket"


class S3Bucket:
    scheme, word = "s3", "bucket"

    def __init__(self, env: dict):
        import boto3

        self.env = env
        self.client = boto3.client("s3")
        self.client.create_bucket(Bucket=NAME)

    def uri(self, key: str = "", bucket: str = NAME) -> str:
        return f"s3://{bucket}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=NAME, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=NAME, Key=key)["Body"].read()

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=NAME, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def open_uploads(self, keys: tuple[str, ...] = ()) -> list[str]:
        """Multipart uploads never completed nor aborted (keys: only these; default all)."""
        found = [u["Key"] for u in self.client.list_multipart_uploads(Bucket=NAME).get("Uploads", [])]
        return [k for k in found if not keys or k in keys]

    def leave_open_upload(self, key: str) -> None:
        """What kill -9 leaves mid-way through writing a large object."""
        upload_id = self.client.create_multipart_upload(Bucket=NAME, Key=key)["UploadId"]
        self.client.upload_part(Bucket=NAME, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * 1024)

    def bad_credentials(self, folder: Path):
        """A server that checks credentials, and an environment with a wrong secret for it."""
        from s3_server import moto_server

        @contextmanager
        def server():
            with moto_server(folder / "auth.log", auth=True) as env:
                yield {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-do-not-print"}, "wrong-secret-do-not-print"

        return server()

    missing_extra = "boto3"
    install_hint = "pip install 'embedder[s3]'"
    denied = "access to bucket {name} denied"


class AzureBucket:
    scheme, word = "az", "container"

    def __init__(self, env: dict, port: int):
        from azure.storage.blob import BlobServiceClient

        self.env, self.port = env, port
        self.service = BlobServiceClient.from_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"])
        self.container = self.service.create_container(NAME)

    def uri(self, key: str = "", bucket: str = NAME) -> str:
        return f"az://{bucket}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.container.upload_blob(key, data, overwrite=True)

    def get(self, key: str) -> bytes:
        return self.container.download_blob(key).readall()

    def keys(self, prefix: str) -> list[str]:
        return sorted(b.name for b in self.container.list_blobs(name_starts_with=prefix or None))

    def open_uploads(self, keys: tuple[str, ...] = ()) -> list[str]:
        """Names among keys holding staged blocks and no committed blob: a write cut short and never finished.

        (Once a blob is committed at a name, Azurite still lists blocks staged there earlier, even after the name
        was deleted in between; Azure drops uncommitted blocks with the next commit or after 7 days.)
        """
        from azure.core.exceptions import ResourceNotFoundError

        found = []
        for key in keys:
            blob = self.container.get_blob_client(key)
            if blob.exists():
                continue
            try:
                _committed, uncommitted = blob.get_block_list("uncommitted")
            except ResourceNotFoundError:
                continue
            if uncommitted:
                found.append(key)
        return found

    def leave_open_upload(self, key: str) -> None:
        """What kill -9 leaves mid-way through writing a large blob: a staged block never committed."""
        import base64

        self.container.get_blob_client(key).stage_block(base64.b64encode(b"stray-block").decode(), b"x" * 1024)

    def bad_credentials(self, folder: Path):
        from azurite_server import connection_string

        @contextmanager
        def server():
            wrong = "d3Jvbmcta2V5LWRvLW5vdC1wcmludA=="  # base64 of a wrong key
            yield {"AZURE_STORAGE_CONNECTION_STRING": connection_string(self.port, key=wrong)}, wrong

        return server()

    missing_extra = "azure.storage.blob"
    install_hint = "pip install 'embedder[azure]'"
    denied = "access to container {name} denied"


def clear_store_caches() -> None:
    """The job's clients are cached per process: forget those made for another server."""
    from embedder.io import azure_store, gcs_store, s3_store

    gcs_store._client.cache_clear()
    gcs_store.GCSStore.for_bucket.cache_clear()
    s3_store._client.cache_clear()
    s3_store.S3Store.for_bucket.cache_clear()
    azure_store._service.cache_clear()
    azure_store.AzureStore.for_container.cache_clear()


class GCSBucket:
    scheme, word = "gs", "bucket"

    def __init__(self, env: dict):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.env = env
        self.client = storage.Client(project="emulated", credentials=AnonymousCredentials())
        self.bucket = self.client.create_bucket(NAME)

    def uri(self, key: str = "", bucket: str = NAME) -> str:
        return f"gs://{bucket}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.bucket.blob(key).upload_from_string(data)

    def get(self, key: str) -> bytes:
        return self.bucket.blob(key).download_as_bytes()

    def keys(self, prefix: str) -> list[str]:
        return sorted(b.name for b in self.client.list_blobs(NAME, prefix=prefix or None))

    def open_uploads(self, keys: tuple[str, ...] = ()) -> list[str]:
        """Chunks of an upload never composed: they lie in a hidden '.NAME.upload-ID/' folder beside NAME."""
        return [k for k in keys if any(".upload-" in name for name in self.keys(k.rpartition("/")[0] + "/."))]

    def leave_open_upload(self, key: str) -> None:
        """What kill -9 leaves mid-way through writing a large object: a chunk uploaded, never composed."""
        parent, _, name = key.rpartition("/")
        self.put(f"{parent}/.{name}.upload-killed/000000", b"x" * 1024)

    def bad_credentials(self, folder: Path):
        """No emulator and no usable credentials: the job must say so in one line (the emulator checks none)."""
        @contextmanager
        def server():
            missing = str(folder / "no-such-service-account.json")
            yield {"STORAGE_EMULATOR_HOST": "", "GOOGLE_APPLICATION_CREDENTIALS": missing, "NO_GCE_CHECK": "true"}, \
                "no-such-service-account"

        return server()

    missing_extra = "google.cloud.storage"
    install_hint = "pip install 'embedder[gcs]'"
    denied = "no Google Cloud credentials"


@contextmanager
def started(scheme: str, folder: Path):
    """Start the server of `scheme`; yield (environment for the job, bucket view) once the bucket exists.

    This process is pointed at the server too (environment and fresh clients) until the block ends.
    """
    if scheme == "s3":
        from s3_server import moto_server

        with moto_server(folder / "moto.log") as env, _pointed_at(env):
            yield env, S3Bucket(env)
    elif scheme == "gs":
        from gcs_server import gcs_server

        with gcs_server(folder) as env, _pointed_at(env):
            yield env, GCSBucket(env)
    else:
        from azurite_server import azurite_server

        with azurite_server(folder) as (env, port), _pointed_at(env):
            yield env, AzureBucket(env, port)


@contextmanager
def _pointed_at(env: dict):
    """This process's environment set to env, and the job's cached clients dropped, until the block ends."""
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    clear_store_caches()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        clear_store_caches()
