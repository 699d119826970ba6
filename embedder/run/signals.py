"""SIGTERM and SIGINT for every driver: the first stops the run at the next safe point, a second stops it now.

A safe point is after a batch (the local job keeps what it committed and resumes on a rerun) or, on Ray,
as soon as the driver gets control (it writes no OUT; the actors are stopped with Ray). Either way the
run raises Interrupted, which the command lines turn into exit 130 or 143.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from embedder.errors import Interrupted

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopNow(BaseException):
    """Raised from the handler, wherever the main thread is. A BaseException, so that code it lands in (Ray
    Data's, which logs every Exception it sees with a full trace) lets it through; stop_on_signals turns it
    into Interrupted."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopFlag:
    """Set by a signal; check() raises Interrupted at the caller's next safe point."""

    def __init__(self, at_once: bool = False, outcome: str | None = None):
        self.signum: int | None = None
        self.at_once = at_once  # raise from the handler itself: the driver has no safe point to wait for
        self.outcome = outcome  # what the message tells the user about their output (Interrupted's default)

    def check(self) -> None:
        if self.signum is not None:
            raise self._error(self.signum)

    def _error(self, signum: int) -> Interrupted:
        return Interrupted(signum) if self.outcome is None else Interrupted(signum, self.outcome)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None or self.at_once:  # a second signal, or nothing to finish first
            self.signum = signum
            raise _StopNow(signum)
        self.signum = signum
        logger.warning("%s received: finishing the batch in flight, then stopping", signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals(at_once: bool = False, outcome: str | None = None):
    """Install the handlers for the block (from the main thread only; elsewhere the flag never sets)."""
    stop = StopFlag(at_once, outcome)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop._handle) for s in SIGNALS}
    try:
        yield stop
    except _StopNow as e:
        raise stop._error(e.signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
