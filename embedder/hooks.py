"""Crash points for the resume tests: EMBEDDER_CRASH_AT=NAME:N kills the process with SIGKILL there.

A kill -9 can land anywhere; the tests use these points to land it deterministically at the moments
that matter (before a window commits, mid-window, during the final write). Unset, they cost one
string comparison.
"""

from __future__ import annotations

import os
import signal

_CRASH_AT = os.environ.get("EMBEDDER_CRASH_AT", "")


def crash_point(name: str, count: int) -> None:
    if _CRASH_AT and _CRASH_AT == f"{name}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


def crash_once(name: str) -> None:
    """EMBEDDER_CRASH_ONCE=NAME:MARKER kills, with SIGKILL, the first process to reach point NAME.

    The marker file (created atomically) makes it fire once across every process that shares the
    environment, so a crashed Ray actor restarts and completes instead of crashing again. Read at
    call time: Ray workers get the variable from their runtime environment, not at import.
    """
    setting = os.environ.get("EMBEDDER_CRASH_ONCE", "")
    point, _, marker = setting.partition(":")
    if not marker or point != name:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
