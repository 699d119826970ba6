"""Starting the tests' storage servers: a free port on 127.0.0.1, and waiting until one listens there."""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import closing
from pathlib import Path


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(server: subprocess.Popen, port: int, log: Path, name: str, timeout: float = 60) -> None:
    """Return once the server accepts connections on port; raise with the end of its log if it exits or stalls."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with closing(socket.create_connection(("127.0.0.1", port), timeout=1)):
                return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.1)
