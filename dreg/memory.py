"""Process-level memory settings for long-running, chunk-at-a-time work."""

from __future__ import annotations


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
