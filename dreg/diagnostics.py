"""Stack dumps on demand, for a run that seems stuck.

``kill -USR1 PID`` makes a dreg process (the command, or one of its Dask workers) print
the stack of every one of its threads to its stderr and go on running. Operators use it
to see where a run waits; the reliability tests use it when a run does not finish."""

from __future__ import annotations

import faulthandler
import signal
import sys

STACKS_SIGNAL = signal.SIGUSR1


def enable_stack_dumps() -> None:
    """Print every thread's stack to stderr on SIGUSR1 (idempotent)."""
    try:
        faulthandler.register(STACKS_SIGNAL, file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass  # no usable stderr (a detached process): nothing to print to
