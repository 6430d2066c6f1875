"""Helpers for tests/test_reliability.py: real processes in their own process groups, a
real `prefect server start`, and the Prefect API read from the test process.

Every process is started with ``start_new_session=True`` so that it leads a process
group of its own; a test can then signal that group, see whether anything of it
survives, and clean up exactly what it started (by process-group id, never by name).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import numpy as np
import prefect_db
import psutil
import s3_server
from exact_registrar import METHOD, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGE = "1-bspline"


def exact_pipeline(seconds: float) -> str:
    """One stage of 16³ blocks (overlap 0.25), registered by the exact registrar
    (tests/exact_registrar.py) at `seconds` a block: a run that can be interrupted
    mid-stage without loading elastix."""
    return f"""\
stages:
  - name: bspline
    level: 0
    block_size: 16
    overlap: 0.25
    method: {METHOD}
    transform: bspline
    parameters:
      seconds: {seconds}
"""


# The pipeline of the process-level tests: 0.15 s per block (64 blocks: about 5 s a
# stage on two workers), long enough to act mid-stage after polling every 0.2 s.
PIPELINE = exact_pipeline(0.15)
# Variables of the caller that would change what a child does (another cluster, a
# fault injected on purpose, another API).
DROPPED_VARIABLES = ("DREG_DASK_ADDRESS", "DREG_DASK_WORKERS", "DREG_FAULT_INJECT",
                     "PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_PROFILE")


@dataclass
class Started:
    """A process started as the leader of its own process group."""

    process: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def pgid(self) -> int:
        # The leader of a new session: its process-group id is its pid, and stays valid
        # (as a number) after the leader is gone.
        return self.process.pid

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def last_json(self) -> dict:
        lines = [line for line in self.output().splitlines() if line.startswith("{")]
        assert lines, f"no JSON line in {self.log}:\n{self.output()[-3000:]}"
        return json.loads(lines[-1])


@contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """While children are started: SIGINT not ignored here, so they do not inherit an
    ignored SIGINT. A test run started in the background by a non-interactive shell
    (`cmd &`, as CI may do) ignores SIGINT, and so would every process it starts."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def start(args: list[str], env: dict, log: Path) -> Started:
    """Start `args` as the leader of a new process group, output to `log`, answering
    SIGINT as it would from a terminal."""
    with open(log, "wb") as out, sigint_not_ignored():
        process = subprocess.Popen([str(a) for a in args], env=env, cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Started(process, log)


def start_dask_worker(address: str, root: Path, env: dict, name: str) -> Started:
    """`dask worker` (with its nanny) for the scheduler at `address`: one thread, one
    `block` resource (what dreg's block stages ask for), its own HOME, temporary folder,
    Prefect home and working directory under `root`/`name`, its output in
    `root`/`name`.log."""
    home = root / name
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    worker_env = {**env, "HOME": str(home), "TMPDIR": str(home / "tmp"),
                  "PREFECT_HOME": str(home / ".prefect")}
    return start([BIN / "dask", "worker", address, "--nthreads", "1", "--resources",
                  "block=1", "--no-dashboard", "--local-directory", home / "dask",
                  "--name", name], worker_env, root / f"{name}.log")


def dump_stacks(pgid: int, settle: float = 3.0) -> None:
    """Ask every process of group `pgid` for its threads' stacks (dreg's processes print
    them to their stderr on SIGUSR1: dreg.process); the others may end of it."""
    for member in group_members(pgid):
        try:
            member.send_signal(signal.SIGUSR1)
        except psutil.Error:
            pass
    time.sleep(settle)


def finish(run: Started, timeout: float) -> int:
    """Wait for `run` to exit; its exit status, or an AssertionError with its output and,
    for a run that did not finish, the stacks of its processes at the time."""
    try:
        return run.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        before = len(run.output())
        dump_stacks(run.pgid)
        output = run.output()
        raise AssertionError(f"{run.log.name}: not finished within {timeout} s:\n"
                             f"{output[max(0, before - 3000):before]}\n"
                             f"--- stacks of its processes ---\n"
                             f"{output[before:][:40000]}") from None


def run_to_end(args: list, env: dict, log: Path, timeout: float) -> tuple[Started, float]:
    """Run `args` as `start` does until it exits successfully; the finished run and its
    seconds. Whatever is left of its process group is killed."""
    run = start(args, env, log)
    try:
        status = finish(run, timeout)
        seconds = run.elapsed()
    finally:
        stop(run)
    assert status == 0, run.output()[-3000:]
    return run, seconds


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of process group `pgid`."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def describe(processes: list[psutil.Process]) -> list[str]:
    described = []
    for proc in processes:
        try:
            described.append(f"{proc.pid} {proc.status()} {' '.join(proc.cmdline())[:160]}")
        except psutil.NoSuchProcess:
            continue
    return described


def wait_group_gone(pgid: int, timeout: float) -> list[psutil.Process]:
    """Wait until no live process of group `pgid` is left; returns those left after
    `timeout` (empty when the group is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = group_members(pgid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def group_signal_answers(pgid: int, timeout: float = 0) -> bool:
    """Whether os.killpg(pgid, 0) still finds a process (zombies included) after up to
    `timeout` seconds (orphaned zombies last until init reaps them)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


def stop(started: Started) -> None:
    """Kill what is left of a group this test started (by its id), and reap the leader."""
    if group_members(started.pgid):
        try:
            os.killpg(started.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if started.process.poll() is None:
        try:
            started.process.kill()
        except ProcessLookupError:
            pass
    started.process.wait(timeout=30)
    wait_group_gone(started.pgid, 10)


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             watched: Started | None = None, interval: float = 0.2):
    """Poll `condition` until it returns something true; fail after `timeout`, or as soon
    as `watched` exits (it was expected to still be running)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if watched is not None and watched.process.poll() is not None:
            raise AssertionError(f"{what}: the process exited first with status "
                                 f"{watched.process.returncode}:\n{watched.output()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def wait_for_port(port: int, timeout: float, watched: Started) -> None:
    def answering() -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(answering, timeout, f"port {port}", watched)


def child_environment(tmp: Path, api: str) -> dict[str, str]:
    """The environment of a child process: tests/ on its path (for the exact registrar),
    reporting to `api`."""
    env = {k: v for k, v in subprocess_env().items() if k not in DROPPED_VARIABLES}
    env.update({
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
        # A killed run's output can be taken over 25 s later rather than 65 s.
        "DREG_LEASE_SECONDS": "20",
    })
    return env


@contextmanager
def prefect_server(tmp: Path, timeout: float = 150,
                   database_url: str | None = None) -> Iterator[tuple[str, dict]]:
    """A real `prefect server start` on a free loopback port, PREFECT_HOME in `tmp`, its
    state in `database_url` (a PostgreSQL database, as in production; tests/
    postgres_server.py) or else SQLite in `tmp`; yields the API URL and an environment
    for children that report to it."""
    port = s3_server.free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = child_environment(tmp, api)
    if database_url is None:  # SQLite, migrated already: the server starts as on a 2nd run
        database_url = f"sqlite+aiosqlite:///{prefect_db.seeded(tmp / prefect_db.NAME)}"
    env.update({"PREFECT_UI_API_URL": api, "PREFECT_API_DATABASE_CONNECTION_URL": database_url})
    server = start([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                   env, tmp / "prefect-server.log")
    try:
        s3_server.wait_until_answering(f"{api}/health", server.process, timeout=timeout)
        yield api, child_environment(tmp, api)
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        stop(server)


def stored_blocks(out: Path, stage: str) -> dict[str, float]:
    """The blocks a stage has stored so far (their records, which are written last):
    record file name -> modification time."""
    folder = out / "stages" / stage / "blocks"
    found = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".json"):
                    try:
                        found[entry.name] = entry.stat().st_mtime
                    except FileNotFoundError:
                        continue
    except FileNotFoundError:
        pass
    return found


def block_name(residual_file: str) -> str:
    """`<z>-<y>-<x>-<key>.json` -> `<z>-<y>-<x>`."""
    return residual_file.rsplit("-", 1)[0]


def read_field(uri: str) -> np.ndarray:
    from dreg import field as field_module
    from dreg.io import ome_zarr

    image = field_module.open_field(uri)
    return ome_zarr.read_region(image, 0, tuple(slice(0, n) for n in
                                                image.levels[0].grid.shape_zyx))


# The Prefect API, read from the test process.

@contextmanager
def client_for(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            yield client


def registration_runs(api: str, out: Path) -> list:
    """The top-level `dreg-register` flow runs whose `out` parameter is `out`."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with client_for(api) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["dreg-register"])))
    return [r for r in runs if (r.parameters or {}).get("out") == str(out)]


def flow_run(api: str, flow_run_id) -> object:
    with client_for(api) as client:
        return client.read_flow_run(UUID(str(flow_run_id)))


def subflow_runs(api: str, parent_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with client_for(api) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(str(parent_id))])))


def task_runs(api: str, flow_run_ids: list, name: str = "register-blocks",
              timeout: float = 60) -> list:
    """Task runs named like `name` of the given flow runs, once every one is final (the
    API records task-run states asynchronously)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    deadline = time.monotonic() + timeout
    with client_for(api) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[UUID(str(i)) for i in flow_run_ids])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)),
                limit=200,
            )
            if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)
