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
