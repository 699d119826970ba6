"""The lock of a bucket's work folder: a lease object created with a conditional PUT and renewed while the job runs.

Object stores have no flock and no rename. The first job writes work/_lease with If-None-Match: *, which the
store refuses (412) to every job after it. The holder rewrites the lease with If-Match on its own ETag
every ttl/4 seconds, pushing its expiry ttl seconds ahead; a job that finds the lease expired, or held by a
process of this host that no longer runs, takes it over (If-Match on the ETag it read: of two such jobs,
one wins). So a job killed with -9 blocks a rerun on another host for at most the lease's ttl, and a rerun
on the same host not at all. --restart takes over any lease (the operator says the holder is gone).

On a store that ignores conditional writes (some S3-compatible servers), the lease read back after
writing it names its owner: a second job that overwrote a first one within that window stops at its
next renewal or commit, when it finds the lease is no longer its own.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from embedder.errors import LockedError

logger = logging.getLogger(__name__)

_CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict")


def lease_seconds() -> float:
    """How long a lease outlives its holder's last renewal ($EMBEDDER_LEASE_SECONDS, default 60)."""
    return float(os.environ.get("EMBEDDER_LEASE_SECONDS", "60"))


class Lease:
    """Context manager: hold the lease on `path` of an S3Store while the block runs; yields a check()."""

    def __init__(self, store, path: str, out_uri: str, take_over: bool):
        self.store, self.path, self.out_uri, self.take_over = store, path, out_uri, take_over
        self.key = store._key(path)
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.ttl = lease_seconds()
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the lease object -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        return json.dumps({**self.owner, "expires": time.time() + self.ttl, "out": self.out_uri}).encode()

    def _put(self, **condition) -> str:
        return self.store.client.put_object(Bucket=self.store.bucket, Key=self.key, Body=self._body(),
                                            **condition)["ETag"]

    def _read(self) -> tuple[dict | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            got = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key)
        except ClientError as e:
            if self.store._code(e) in ("NoSuchKey", "404"):
                return None, None
            raise
        try:
            return json.loads(got["Body"].read()), got["ETag"]
        except ValueError:
            return {}, got["ETag"]  # unreadable: treated as expired

    def _stale(self, holder: dict) -> str | None:
        """Why the holder's lease may be taken over, or None."""
        if self.take_over:
            return "--restart"
        if holder.get("expires", 0) < time.time():
            return "it expired"
        if holder.get("host") == self.owner["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host is gone"
        return None

    def _acquire(self) -> None:
        from botocore.exceptions import ClientError

        for _ in range(5):
            try:
                self.etag = self._put(IfNoneMatch="*")
            except ClientError as e:
                if self.store._code(e) not in _CONFLICT:
                    raise
            else:
                break
            holder, etag = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            why = self._stale(holder)
            if why is None:
                until = time.strftime("%H:%M:%S", time.localtime(holder.get("expires", 0)))
                raise LockedError(
                    f"another job is writing {self.out_uri} (lease {self.store.uri(self.path)} held by pid "
                    f"{holder.get('pid')} on {holder.get('host')} until {until}, renewed while it runs); a job "
                    "killed without releasing it holds it until then, or pass --restart to take it over")
            try:
                self.etag = self._put(IfMatch=etag)
            except ClientError as e:
                if self.store._code(e) not in _CONFLICT:
                    raise
                continue  # another job took it first: look again
            logger.info("took over the lease of %s (%s)", self.out_uri, why)
            break
        else:
            raise LockedError(f"another job is writing {self.out_uri} (its lease {self.store.uri(self.path)} "
                              "keeps changing)")
        holder, _ = self._read()  # a store that ignored the condition shows another owner here
        if holder is None or holder.get("id") != self.owner["id"]:
            raise LockedError(f"another job is writing {self.out_uri} (it took the lease {self.store.uri(self.path)})")

    def _renew_forever(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(self.ttl / 4):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except ClientError as e:
                if self.store._code(e) in _CONFLICT:
                    self.lost = f"lost the lease {self.store.uri(self.path)} of {self.out_uri} to another job"
                    return
                logger.warning("renewing the lease %s failed (%s); retrying", self.store.uri(self.path), e)
            except BotoCoreError as e:
                logger.warning("renewing the lease %s failed (%s); retrying", self.store.uri(self.path), e)

    def check(self) -> None:
        """Raise LockedError once another job has taken the lease: stop before writing anything more."""
        if self.lost:
            raise LockedError(self.lost)

    # -- context manager --------------------------------------------------------------------------------
    def __enter__(self):
        with self.store._explained("PutObject", self.path, LockedError):
            self._acquire()
        self._thread = threading.Thread(target=self._renew_forever, name="embedder-lease", daemon=True)
        self._thread.start()
        return self.check

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            return
        try:  # release: delete only our own lease
            holder, _ = self._read()
            if holder is not None and holder.get("id") == self.owner["id"]:
                self.store.client.delete_object(Bucket=self.store.bucket, Key=self.key)
        except Exception as e:  # it expires on its own
            logger.warning("could not release the lease %s (%s); it expires in %.0f s", self.store.uri(self.path),
                           e, self.ttl)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill would address a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
