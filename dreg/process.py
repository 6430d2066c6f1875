"""Process-level settings for long-running, chunk-at-a-time work: memory that goes
back to the system when freed, and stacks printed on demand.

``kill -USR1 PID`` makes a dreg process (the command, or one of its Dask workers) print
the stack of every one of its threads to its stderr and go on running. Operators use it
to see where a run waits; the reliability tests use it when a run does not finish."""

from __future__ import annotations

import faulthandler
import signal
import sys

STACKS_SIGNAL = signal.SIGUSR1


def release_freed_memory_promptly() -> None:
    """Make glibc serve blocks of 1 MiB and more with mmap, so that they go back to the
    system as soon as they are freed.

    Chunk-sized buffers are allocated and freed all the time by several threads. By
    default glibc raises its mmap threshold after such frees, and from then on keeps the
    freed blocks in per-thread arenas: measured, that retained about as much memory again
    as the working set. Setting the threshold also stops that adjustment. No effect where
    the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


def enable_stack_dumps() -> None:
    """Print every thread's stack to stderr on SIGUSR1 (idempotent)."""
    try:
        faulthandler.register(STACKS_SIGNAL, file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass  # no usable stderr (a detached process): nothing to print to
