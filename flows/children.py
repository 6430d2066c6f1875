"""The processes a command starts: the temporary Prefect API server and the local Dask
cluster's workers.

A terminal's Ctrl-C sends SIGINT to its whole foreground process group, which holds
these children as well as `dreg`. Were they interrupted with `dreg`, the API server
would die first, and `dreg` would then spend minutes retrying to record its flow run as
ended on a server that is gone. So every child starts with SIGINT blocked (a blocked
signal stays pending, unseen): only `dreg` answers Ctrl-C, and it stops its children in
order (cluster, then the API server, after the last logs and events are sent). The
children stay in `dreg`'s process group, so a SIGKILL of the group still ends them all.

The signal mask is inherited by threads and processes, but not by those already running:
a child started from a thread created inside `sigint_blocked` is shielded too (Dask's
nanny restarts a worker from such a thread).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing import resource_tracker
from pathlib import Path

# Prefect's default for the temporary server's start-up is 20 s: a busy machine (load
# twice its cores) takes longer than that to import the server and migrate its
# database. dreg waits this long unless PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
# says otherwise.
STARTUP_TIMEOUT_S = 300
STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# Bounds of the shutdown: sending the last logs and events, then the server's stop.
DRAIN_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """While inside: SIGINT blocked in this thread, so that the processes and threads
    it starts (and what those start) begin with SIGINT blocked. A SIGINT that arrives
    meanwhile is not lost: another thread of this process takes it, or this one when the
    block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def startup_timeout() -> int:
    """Seconds to wait for the temporary API server: the Prefect setting when it was
    changed from Prefect's default, else STARTUP_TIMEOUT_S."""
    from prefect.settings import get_current_settings
    from prefect.settings.models.server.ephemeral import ServerEphemeralSettings

    given = get_current_settings().server.ephemeral.startup_timeout_seconds
    prefect_default = ServerEphemeralSettings.model_fields["startup_timeout_seconds"].default
    return STARTUP_TIMEOUT_S if given == prefect_default else int(given)


def _temporary_server_class():
    from prefect.server.api.server import SubprocessASGIServer

    from dreg.errors import RunFailed

    class TemporaryServer(SubprocessASGIServer):
        """Prefect's temporary API server, started with SIGINT blocked and a start-up
        wait that a busy machine can meet; a start-up that times out is one line."""

        # What `stop_children` stops: a temporary server another part of the program
        # started (a test harness's, an embedding program's) is not this command's.
        owned_by_dreg = True

        def _run_uvicorn_command(self) -> subprocess.Popen:
            with sigint_blocked():
                return super()._run_uvicorn_command()

        def start(self, timeout: int | None = None) -> None:
            timeout = timeout or startup_timeout()
            started = time.monotonic()
            try:
                super().start(timeout=timeout)
            except RuntimeError as exc:
                if "Timed out" not in str(exc):
                    raise
                if self.server_process is not None:
                    # It never served: killed, it cannot print its shutdown's traceback.
                    self.server_process.kill()
                    self.server_process.wait()
                self.stop()
                raise RunFailed(
                    f"the temporary Prefect API server did not answer within {timeout} s "
                    f"(waited {time.monotonic() - started:.0f} s; a busy machine?); set "
                    f"{STARTUP_SETTING} higher, or PREFECT_API_URL to a running server"
                ) from None

        def stop(self) -> None:
            process = self.server_process
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            super().stop()

    return TemporaryServer


def use_temporary_server() -> bool:
    """When no Prefect API is configured: make the temporary server that Prefect starts
    on first use the shielded one above. A command calls it once its input is checked,
    just before its flow (importing the server takes seconds: bad input is refused
    without it), and `stop_children` as it ends. Returns whether a temporary
    server will be used."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return False
    check_database_folder()
    from prefect.server.api.server import SubprocessASGIServer

    if None not in SubprocessASGIServer._instances:
        # Prefect asks SubprocessASGIServer() for the instance registered under no port:
        # constructing ours registers it there.
        _temporary_server_class()()
    return True


def check_database_folder() -> None:
    """The temporary server keeps its SQLite database in PREFECT_HOME: a folder that
    cannot be made or written is an InputError naming it, at once (the server would
    fail to start, again and again, until the start-up wait ran out)."""
    from prefect.settings import get_current_settings

    from dreg.errors import InputError

    url = get_current_settings().server.database.connection_url.get_secret_value()
    scheme, _, path = url.partition(":///")
    if not scheme.startswith("sqlite") or not path or path == ":memory:":
        return
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(folder, os.W_OK | os.X_OK) else "not writable"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    if problem:
        raise InputError(f"{folder}: {problem}; the temporary Prefect API server keeps its "
                         f"database there (set PREFECT_HOME to a folder you can write, or "
                         f"PREFECT_API_URL to a running server)")


def stop_children() -> None:
    """What a command does last: send the logs and events still queued (bounded), stop
    the temporary API server if one was started, and stop the multiprocessing resource
    tracker if a local cluster started one; wait for each, so that no process of the
    command outlives it."""
    if "prefect.server.api.server" in sys.modules:
        _stop_temporary_server()
    # Private, but the only way to wait for it: left alone, it exits only after this
    # process does, on seeing its pipe closed. Only once no child process is left: a
    # live child holds the tracker's pipe too, and stopping would wait for that child
    # (a cluster this process still runs when `dreg` is called inside a program).
    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None and not multiprocessing.active_children():
        stop()


def _stop_temporary_server() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    if (server is None or server.server_process is None
            or not getattr(server, "owned_by_dreg", False)):
        return
    if server.server_process.poll() is None:
        # Sent before the server goes: afterwards they would retry against a dead port.
        APILogWorker.drain_all(timeout=DRAIN_TIMEOUT_S)
        EventsWorker.drain_all(timeout=DRAIN_TIMEOUT_S)
    server.stop()
