"""Test-only: kill this process with SIGKILL at a named point of embedder.hooks.

A test puts this folder first on PYTHONPATH of the processes it starts (subprocesses, Ray workers), so
Python imports this module at start-up, and names a spec file in EMBEDDER_TEST_FAULT_FILE (read only here,
never by the library). The spec is JSON, read when a point is reached, so a test can arm and disarm it
while workers live:
    {"point": "batch", "count": 40}            kill at the 40th batch of this process
    {"point": "written", "once": "/tmp/mark"}  kill the first process to get there (it creates the
                                               marker atomically); the others, and the restarted one, go on
"""

from __future__ import annotations

import json
import os
import signal


def _kill_at(spec_file: str):
    def hook(point: str, count: int) -> None:
        try:
            with open(spec_file) as f:
                spec = json.load(f)
        except (OSError, ValueError):
            return  # not armed
        if spec.get("point") != point:
            return
        if "once" in spec:
            try:
                os.close(os.open(spec["once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        elif spec.get("count") != count:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    return hook


if os.environ.get("EMBEDDER_TEST_FAULT_FILE"):
    import embedder.hooks

    embedder.hooks.install(_kill_at(os.environ["EMBEDDER_TEST_FAULT_FILE"]))
