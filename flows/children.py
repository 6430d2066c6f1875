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
import socket
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


class TemporaryServer:
    """Prefect's API server as this command's child: started with SIGINT blocked on a
    free loopback port, reported to through PREFECT_API_URL, stopped by `stop_children`.

    dreg starts it itself rather than through Prefect's own temporary server: that one
    imports the whole server (seconds) into this process only to launch it, and starts it
    on the first API call, after this process has imported everything else; this one
    starts first and comes up while the command imports its flows."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.previous_url: str | None = os.environ.get(API_URL_VARIABLE)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Launch the server and point this process (and the processes it starts) at it.
        Returns at once: `wait_until_serving` waits for it."""
        from prefect.settings import get_current_settings

        environment = {**os.environ, **SERVER_ENVIRONMENT,
                       **get_current_settings().to_environment_variables(exclude_unset=True)}
        environment.pop(API_URL_VARIABLE, None)
        self.port = _free_port()
        # Prefect's own command for its temporary server (the app factory, no UI).
        command = [sys.executable, "-m", "uvicorn", "--app-dir", _prefect_parent(),
                   "--factory", "prefect.server.api.server:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "error", "--lifespan", "on"]
        with sigint_blocked():
            self.process = subprocess.Popen(command, env=environment)
        _point_prefect_at(self.api_url)

    def wait_until_serving(self, timeout: int | None = None) -> None:
        """Return once the server answers its health check; RunFailed, one line, when it
        exits or does not answer within the start-up wait."""
        import httpx

        from dreg.errors import RunFailed

        timeout = timeout or startup_timeout()
        started = time.monotonic()
        with httpx.Client() as client:
            while time.monotonic() - started < timeout:
                if self.process.poll() is not None:
                    code = self.process.returncode
                    self.stop()
                    raise RunFailed(f"the temporary Prefect API server exited with code {code} "
                                    f"before it served; set PREFECT_API_URL to a running server")
                try:
                    if client.get(f"{self.api_url}/health", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        # It never served: killed, it cannot print its shutdown's traceback.
        self.process.kill()
        self.stop()
        raise RunFailed(
            f"the temporary Prefect API server did not answer within {timeout} s "
            f"(waited {time.monotonic() - started:.0f} s; a busy machine?); set "
            f"{STARTUP_SETTING} higher, or PREFECT_API_URL to a running server")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after STOP_TIMEOUT_S), wait for it, and
        point Prefect back at what was configured before."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _point_prefect_at(self.previous_url)


API_URL_VARIABLE = "PREFECT_API_URL"
# What Prefect sets for its own temporary server: no UI, and the server's ephemeral mode.
SERVER_ENVIRONMENT = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                      "PREFECT__SERVER_FINAL": "1"}
_temporary_server: TemporaryServer | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _prefect_parent() -> str:
    import prefect

    return str(Path(prefect.__file__).parent.parent)


def _point_prefect_at(api_url: str | None) -> None:
    """Set PREFECT_API_URL for this process, its later children, and Prefect's settings
    (which Prefect read when it was imported)."""
    from prefect.context import refresh_global_settings_context

    if api_url is None:
        os.environ.pop(API_URL_VARIABLE, None)
    else:
        os.environ[API_URL_VARIABLE] = api_url
    refresh_global_settings_context()


def use_temporary_server() -> bool:
    """When no Prefect API is configured: start a temporary server of this command's
    own. A command calls it once its input is checked (bad input is refused without a
    server), then imports its flows while the server comes up, calls
    `wait_for_temporary_server` before its flow, and `stop_children` as it ends. Returns
    whether a temporary server is used."""
    global _temporary_server
    from prefect.settings import PREFECT_API_URL

    if _temporary_server is not None:
        return True
    if PREFECT_API_URL.value():
        return False
    check_database_folder()
    server = TemporaryServer()
    server.start()
    _temporary_server = server
    return True


def wait_for_temporary_server() -> None:
    """Return once this command's temporary server serves (at once when there is none)."""
    if _temporary_server is not None:
        _temporary_server.wait_until_serving()


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
    the temporary API server if this command started one, and stop the multiprocessing
    resource tracker if a local cluster started one; wait for each, so that no process
    of the command outlives it."""
    _stop_temporary_server()
    # Private, but the only way to wait for it: left alone, it exits only after this
    # process does, on seeing its pipe closed. Only once no child process is left: a
    # live child holds the tracker's pipe too, and stopping would wait for that child
    # (a cluster this process still runs when `dreg` is called inside a program).
    stop = getattr(resource_tracker._resource_tracker, "_stop", None)
    if stop is not None and not multiprocessing.active_children():
        stop()


def _stop_temporary_server() -> None:
    global _temporary_server
    server, _temporary_server = _temporary_server, None
    if server is None:
        # None started, or a server another part of the program started (a test
        # harness's, an embedding program's): not this command's to stop.
        return
    if server.process is not None and server.process.poll() is None:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        # Sent before the server goes: afterwards they would retry against a dead port.
        APILogWorker.drain_all(timeout=DRAIN_TIMEOUT_S)
        EventsWorker.drain_all(timeout=DRAIN_TIMEOUT_S)
    server.stop()
