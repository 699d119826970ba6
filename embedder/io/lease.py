"""The lock of a bucket's work folder: a lease object created with a conditional write and renewed while the job runs.

Object stores have no flock and no rename. The first job creates work/_lease only if it does not exist
(S3 and Azure: If-None-Match: *; GCS: ifGenerationMatch=0), which the store refuses to every job after it.
The holder rewrites the lease only if it is still the version it wrote (If-Match on its ETag, or its
generation) every ttl/4 seconds, pushing its expiry ttl seconds ahead. A job that finds the lease expired,
or held by a process of this host that no longer runs, takes it over with the same conditional rewrite
on the version it read: of two such jobs, one wins. So a job killed with -9 blocks a rerun on another
host for at most the lease's ttl, and a rerun on the same host not at all. --restart takes over any
lease (the operator says the holder is gone).

On a store that ignores conditional writes (some S3-compatible servers), the lease read back after
writing it names its owner: a second job that overwrote a first one within that window stops at its
next renewal or commit, when it finds the lease is no longer its own.

The store supplies three conditional operations (ObjectStore in io/store.py): create_new, replace_if and
read_versioned.
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


def lease_seconds() -> float:
    """How long a lease outlives its holder's last renewal ($EMBEDDER_LEASE_SECONDS, default 60)."""
    return float(os.environ.get("EMBEDDER_LEASE_SECONDS", "60"))


class Lease:
    """Context manager: hold the lease at `path` of an object store while the block runs; yields a check()."""

    def __init__(self, store, path: str, out_uri: str, take_over: bool):
        self.store, self.path, self.out_uri, self.take_over = store, path, out_uri, take_over
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.ttl = lease_seconds()
        self.version: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "expires": time.time() + self.ttl, "out": self.out_uri}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        found = self.store.read_versioned(self.path)
        if found is None:
            return None, None
        data, version = found
        try:
            return json.loads(data), version
        except ValueError:
            return {}, version  # unreadable: treated as expired

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
        for _ in range(5):
            self.version = self.store.create_new(self.path, self._body())
            if self.version is not None:
                break
            holder, version = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            why = self._stale(holder)
            if why is None:
                until = time.strftime("%H:%M:%S", time.localtime(holder.get("expires", 0)))
                raise LockedError(
                    f"another job is writing {self.out_uri} (lease {self.store.uri(self.path)} held by pid "
                    f"{holder.get('pid')} on {holder.get('host')} until {until}, renewed while it runs); a job "
                    "killed without releasing it holds it until then, or pass --restart to take it over")
            self.version = self.store.replace_if(self.path, self._body(), version)
            if self.version is not None:
                logger.info("took over the lease of %s (%s)", self.out_uri, why)
                break
            # another job took it first: look again
        else:
            raise LockedError(f"another job is writing {self.out_uri} (its lease {self.store.uri(self.path)} "
                              "keeps changing)")
        holder, _ = self._read()  # a store that ignored the condition shows another owner here
        if holder is None or holder.get("id") != self.owner["id"]:
            raise LockedError(f"another job is writing {self.out_uri} (it took the lease {self.store.uri(self.path)})")

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                version = self.store.replace_if(self.path, self._body(), self.version)
            except Exception as e:  # noqa: BLE001 (a transient failure: the lease outlives a few of them)
                logger.warning("renewing the lease %s failed (%s); retrying", self.store.uri(self.path), e)
                continue
            if version is None:
                self.lost = f"lost the lease {self.store.uri(self.path)} of {self.out_uri} to another job"
                return
            self.version = version

    def check(self) -> None:
        """Raise LockedError once another job has taken the lease: stop before writing anything more."""
        if self.lost:
            raise LockedError(self.lost)

    def __enter__(self):
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
                self.store.delete(self.path)
        except Exception as e:  # noqa: BLE001 (it expires on its own)
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
