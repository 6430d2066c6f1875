"""How dreg's compiled loops are compiled (Numba): in nopython mode, releasing the GIL,
and cached on disk where Numba can write its cache.

A new process then loads the machine code instead of compiling it (about a second per
module). Numba keeps the cache next to the source, else under the user's cache folder,
or under NUMBA_CACHE_DIR when that is set; where none is writable (a read-only install
and HOME), it refuses `cache=True` outright, so the loops are compiled in each process.
"""

from __future__ import annotations

from collections.abc import Callable

from numba import njit


def jit(function: Callable | None = None, **options):
    """`numba.njit(cache=True, nogil=True, **options)`, without the cache where Numba has
    nowhere to keep it. Usable bare (`@jit`) or with options (`@jit(inline="always")`)."""

    def compile_lazily(python_function: Callable):
        try:
            return njit(cache=True, nogil=True, **options)(python_function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(nogil=True, **options)(python_function)

    return compile_lazily if function is None else compile_lazily(function)
