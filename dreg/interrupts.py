"""Interrupts that are never lost.

SIGINT or SIGTERM raises an exception in whatever the main thread is running at that
moment. When that is library code that stores exceptions for a caller that never reads
them (an orchestration client's background call, say), the exception is gone and the
run would carry on to a complete-looking result. `watching()` therefore also records
every such signal, and `check()`, called at the points where a run commits to its next
step, raises for a recorded one however the first exception fared.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

WATCHED = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []
_depth = [0]


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal it received earlier."""


def _chained(previous):
    def handler(signum, frame):
        _received.append(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise Interrupted(f"interrupted by {signal.Signals(signum).name}")
    return handler


@contextmanager
def watching() -> Iterator[None]:
    """Record SIGINT and SIGTERM while the block runs, then hand each on to the handler
    that was there before (which raises as usual). Nested blocks (a flow inside a flow,
    each of which may have set handlers of its own) keep one record, cleared when the
    outermost block ends. Outside the main thread, where handlers cannot be set, it
    records nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in WATCHED}
    for s in WATCHED:
        if previous[s] not in (signal.SIG_IGN, None):
            signal.signal(s, _chained(previous[s]))
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for s in WATCHED:
            if previous[s] is not None:
                signal.signal(s, previous[s])
        if _depth[0] == 0:
            _received.clear()


def check() -> None:
    """Raise Interrupted if a watched signal has arrived."""
    if _received:
        raise Interrupted(f"interrupted by {signal.Signals(_received[0]).name}")
