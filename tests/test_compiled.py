"""The compiled loops still compile where Numba has nowhere to keep its cache."""

from __future__ import annotations

import numpy as np

from dreg import compiled


def test_without_a_cache_location_loops_compile_uncached(monkeypatch):
    real_njit = compiled.njit

    def refusing_cache(**options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return real_njit(**options)

    monkeypatch.setattr(compiled, "njit", refusing_cache)

    @compiled.jit
    def double(values):
        return values * 2

    np.testing.assert_array_equal(double(np.arange(3)), [0, 2, 4])
