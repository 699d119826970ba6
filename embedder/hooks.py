"""Named points of a run where a test may act: no-ops unless a hook is installed, which only tests do.

The run reports each point it reaches with a count:
    batch     a batch embedded (count: batches of this process)        run/local.py
    window    a window committed to the work folder (count: windows)    run/local.py
    merge     a committed part copied into OUT (count: parts)           io/workfolder.py
    embedded  a Ray actor embedded a window of its block (count: 0)     run/ray_actor.py
    written   a Ray actor committed a block's part file (count: 0)      run/ray_actor.py

tests/fault_site/sitecustomize.py installs a hook that kills the process at a chosen point, in the
processes and Ray actors a test starts; the library itself reads no setting for it.
"""

from __future__ import annotations

from collections.abc import Callable

Hook = Callable[[str, int], None]

_hook: Hook | None = None


def install(hook: Hook | None) -> Hook | None:
    """Call hook(point, count) at every point from now on (None removes it); returns the previous hook."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def reached(point: str, count: int = 0) -> None:
    if _hook is not None:
        _hook(point, count)
