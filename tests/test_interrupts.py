"""A signal is never lost: what `dreg.interrupts` records outlives a swallowed exception."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dreg import interrupts


def deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.2)  # the handler runs in the main thread at the next bytecode


def test_an_interrupt_whose_exception_was_swallowed_is_still_raised_at_the_next_check():
    interrupts.check()
    with interrupts.watching():
        try:
            deliver(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # as library code that stores exceptions nobody reads may do
        with pytest.raises(interrupts.Interrupted, match="SIGINT"):
            interrupts.check()
    interrupts.check()  # the record ends with the watch


def test_sigterm_under_the_default_handler_raises_and_is_recorded():
    with interrupts.watching():
        with pytest.raises(interrupts.Interrupted, match="SIGTERM"):
            deliver(signal.SIGTERM)
        with pytest.raises(interrupts.Interrupted):
            interrupts.check()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_nested_watches_keep_one_record_until_the_outermost_ends():
    with interrupts.watching():
        with interrupts.watching():
            with pytest.raises(KeyboardInterrupt):
                deliver(signal.SIGINT)
        with pytest.raises(interrupts.Interrupted):
            interrupts.check()
    interrupts.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
