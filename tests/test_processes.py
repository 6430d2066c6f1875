"""`dreg` as a process among processes (issue 18, items 10 and 11, and "a busy machine
fails nothing").

Each command runs as a subprocess leading a process group of its own, on the embedded
defaults: Prefect's temporary API server (no PREFECT_API_URL) and a local Dask cluster,
both children of `dreg` in its process group, as a terminal starts them. Blocks are
registered by the exact registrar (no elastix).

- Ctrl-C as a terminal sends it: SIGINT to the whole group, mid-stage (item 10).
- A command that ends leaves no process of its group behind (item 11): checked the
  moment each command here exits.
- The temporary API server's start-up that times out is one line naming the setting
  that raises the wait.
- A busy machine: register, warp and qc at once, with a CPU hog per core while they
  start: the hogs and the commands' own processes keep the load at twice the core count
  or more (marked slow).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import prefect_db
import pytest
from exact_registrar import subprocess_env
from reliability_helpers import (
    BIN,
    DROPPED_VARIABLES,
    Started,
    describe,
    exact_pipeline,
    finish,
    group_members,
    read_field,
    start,
    stop,
    stored_blocks,
    wait_for,
)

from dreg.grid import Grid

pytestmark = pytest.mark.full

PAIR = {"grid": Grid((48, 48, 48), (1.0, 1.0, 1.0)), "seed": 3, "amplitude_voxels": 2.0,
        "chunks": 24}
STAGE = "1-bspline"
# 27 blocks of 16³ at half a second each: a stage long enough to be interrupted.
SLOW_PIPELINE = exact_pipeline(0.5)
# 8 blocks of 24³, as fast as the exact registrar goes.
PIPELINE = SLOW_PIPELINE.replace("block_size: 16", "block_size: 24").replace(
    "    parameters:\n      seconds: 0.5\n", "")
INTERRUPT_AT = 4          # blocks stored before the group is signalled
MID_STAGE_TIMEOUT_S = 300
EXIT_TIMEOUT_S = 30       # Ctrl-C ends the run within this (measured 8 to 12 s, load 5 to 27)
RUN_TIMEOUT_S = 900       # one command on a machine loaded to twice its cores
FINAL_STATES = {"CANCELLED", "CRASHED", "FAILED"}


def environment(tmp: Path, **extra: str) -> dict:
    """A child's environment on the embedded defaults: no API configured (so `dreg`
    starts Prefect's temporary server, whose database is in PREFECT_HOME), the exact
    registrar importable."""
    env = {k: v for k, v in subprocess_env().items() if k not in DROPPED_VARIABLES}
    home = tmp / "prefect-home"
    if not (home / prefect_db.NAME).exists():
        prefect_db.seeded_home(home)  # migrated already: the server starts as on a 2nd run
    env.update({"PREFECT_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1",
                **extra})
    return env


def register_args(pair: dict, out: Path, pipeline: Path, *extra: str,
                  workers: int = 2) -> list:
    return [BIN / "dreg", "register", pair["fixed"], pair["moving"], out, "--config",
            pipeline, "--workers", str(workers), "--no-qc", *extra]


def group_left(run: Started) -> list[str]:
    """Processes of the command's group alive the moment it has exited (item 11: it
    waits for every child before exiting, so there must be none)."""
    return describe(group_members(run.pgid))


def dreg_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("dreg:")]


def flow_run_states(prefect_home: Path) -> dict[str, str]:
    """Flow run name -> state type, read from the temporary server's database (which
    outlives the server)."""
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return dict(db.execute("SELECT name, state_type FROM flow_run").fetchall())


@pytest.fixture
def slow_pipeline(tmp_path) -> Path:
    path = tmp_path / "slow.yaml"
    path.write_text(SLOW_PIPELINE)
    return path


def test_ctrl_c_to_the_process_group(pair, slow_pipeline, tmp_path):
    """Issue 18 item 10: SIGINT to `dreg register`'s whole process group (as a
    terminal's Ctrl-C sends it) mid-stage: exit 130 within seconds with one line, no
    result.json, the flow runs recorded final on the temporary server before it
    stopped, and no process of the group left."""
    env = environment(tmp_path)
    out = tmp_path / "out"
    run = start(register_args(pair, out, slow_pipeline), env, tmp_path / "register.log")
    status = None
    try:
        wait_for(lambda: len(stored_blocks(out, STAGE)) >= INTERRUPT_AT, MID_STAGE_TIMEOUT_S,
                 "blocks stored before Ctrl-C", run)
        members = group_members(run.pgid)
        at_signal = len(run.output())
        os.killpg(run.pgid, signal.SIGINT)
        sent = time.monotonic()
        try:
            status = run.process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        seconds = time.monotonic() - sent
        left = group_left(run)
    finally:
        stop(run)
    after = run.output()[at_signal:]
    print(json.dumps({"ctrl_c_to_the_group": {
        "group_processes_at_signal": len(members), "exit_status": status,
        "exit_seconds": round(seconds, 1), "left": left}}))
    assert len(members) >= 4, "the group should hold dreg, the API server and the workers"
    assert status == 130, f"exit {status} after {seconds:.0f} s:\n{run.output()[-3000:]}"
    assert dreg_lines(run.output()) == ["dreg: interrupted"]
    assert "Traceback" not in after, after[-3000:]
    assert not left, f"processes of the group outlived dreg: {left}"
    assert not (out / "result.json").exists()
    states = flow_run_states(tmp_path / "prefect-home")
    assert states and set(states.values()) <= FINAL_STATES, states


def test_the_temporary_server_start_up_timing_out_is_one_line(pair, tmp_path):
    """Issue 18, a busy machine: when Prefect's temporary API server does not answer in
    time, the command fails with one line saying what timed out and the setting that
    raises the wait, and leaves no process behind (item 11)."""
    (tmp_path / "p.yaml").write_text(PIPELINE)
    env = environment(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    run = start(register_args(pair, tmp_path / "out", tmp_path / "p.yaml"), env,
                tmp_path / "register.log")
    try:
        status = finish(run, RUN_TIMEOUT_S)
        left = group_left(run)
    finally:
        stop(run)
    output = run.output()
    assert status == 1, output[-3000:]
    (line,) = dreg_lines(output)
    assert line.startswith("dreg: failed: the temporary Prefect API server did not answer")
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line
    assert "Traceback" not in output, output[-3000:]
    assert not left, f"processes of the group outlived dreg: {left}"


def cpu_hogs(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             start_new_session=True) for _ in range(count)]


# Logged by a command once its API server, flow run and cluster are up: the task runner
# connects to the cluster the command started.
STARTED_MARKER = "Connecting to an existing Dask cluster"


def commands_at_once(commands: dict[str, list], folder: Path,
                     when_started: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """Start the `dreg` commands together, each on the embedded defaults with a Prefect
    home of its own, and run them to their ends: by name, the exit status, seconds,
    output, and what of its process group was alive the moment it exited.
    `when_started` is called once every command has started (STARTED_MARKER) or ended."""
    homes = {name: folder / "homes" / name for name in commands}
    runs = {name: start(args, environment(homes[name]), folder / f"{name}.log")
            for name, args in commands.items()}
    outcomes: dict[str, dict] = {}
    started: set[str] = set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while len(outcomes) < len(runs) and time.monotonic() < deadline:
            for name, run in runs.items():
                if name not in outcomes and run.process.poll() is not None:
                    outcomes[name] = {"status": run.process.returncode,
                                      "seconds": round(run.elapsed(), 1),
                                      "left": group_left(run), "output": run.output()}
                if name not in started and (name in outcomes
                                            or STARTED_MARKER in run.output()):
                    started.add(name)
                    if len(started) == len(runs):
                        when_started()
            time.sleep(0.2)
    finally:
        for run in runs.values():
            stop(run)
    late = sorted(set(runs) - set(outcomes))
    assert not late, f"not finished within {RUN_TIMEOUT_S} s: {late}"
    return outcomes


def timed_out_in_one_line(outcome: dict) -> bool:
    """A failure the issue allows on a busy machine: exit 1 with one line that says what
    timed out and names the setting that raises the wait."""
    lines = dreg_lines(outcome["output"])
    return (outcome["status"] == 1 and len(lines) == 1
            and "Traceback" not in outcome["output"] and "_SECONDS" in lines[0]
            and ("did not answer" in lines[0] or "timed out" in lines[0]))


@pytest.mark.slow
def test_a_busy_machine_fails_nothing(pair, prefect_api, dask_address, tmp_path):
    """Issue 18, "a busy machine fails nothing": `dreg register`, `dreg warp` and
    `dreg qc`, each starting its own temporary API server and local cluster, with a CPU
    hog per core while they start (where the waits that time out are: the API servers,
    the flow runs, the clusters and their workers' set-up): with the commands' nine
    processes the load is twice the core count or more (printed). The hogs stop once
    every command is connected to its cluster, so that the suite's other tests are not
    starved for the rest. Each completes (the field bit-identical to a quiet run's) or
    fails with one line naming what timed out and its setting; none leaves a process of
    its group behind (item 11)."""
    from dreg.registration.pipeline import load_pipeline
    from flows.options import RunOptions
    from flows.registration import register_images

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(PIPELINE)
    quiet = register_images(pair["fixed"], pair["moving"], str(tmp_path / "quiet"),
                            load_pipeline(pipeline),
                            options=RunOptions(dask_address=dask_address, qc=False))
    # Warp and qc each work on a copy of the quiet run's OUT, so that all three commands
    # start at once: three temporary API servers and three clusters starting together.
    for name in ("warp", "qc"):
        shutil.copytree(tmp_path / "quiet", tmp_path / name)
    out = tmp_path / "out"
    hogs = cpu_hogs(os.cpu_count() or 1)
    loads = {}

    def stop_hogs() -> None:
        loads.setdefault("load_when_started", round(os.getloadavg()[0], 1))
        for hog in hogs:
            hog.kill()
            hog.wait()

    try:
        time.sleep(1)  # the hogs are busy at once; the load average (printed) follows
        load_at_start = os.getloadavg()[0]
        # One worker each: fewer processes to start on the busy machine, same field.
        outcomes = commands_at_once({
            "register": register_args(pair, out, pipeline, workers=1),
            "warp": [BIN / "dreg", "warp", tmp_path / "warp", "--workers", "1"],
            "qc": [BIN / "dreg", "qc", tmp_path / "qc", "--workers", "1"]}, tmp_path,
            when_started=stop_hogs)
        load_at_end = os.getloadavg()[0]
    finally:
        stop_hogs()
    print(json.dumps({"busy_machine": {
        "cores": os.cpu_count(), "hogs": len(hogs), "load_at_start": round(load_at_start, 1),
        **loads, "load_at_end": round(load_at_end, 1),
        **{name: {k: v for k, v in o.items() if k != "output"} for name, o in outcomes.items()}}}))
    for name, outcome in outcomes.items():
        assert not outcome["left"], f"{name}: processes outlived dreg: {outcome['left']}"
        assert outcome["status"] == 0 or timed_out_in_one_line(outcome), (
            f"{name}: exit {outcome['status']}:\n{outcome['output'][-3000:]}")
    if outcomes["register"]["status"] == 0:
        line = json.loads([line for line in outcomes["register"]["output"].splitlines()
                           if line.startswith("{")][-1])
        np.testing.assert_array_equal(read_field(line["field"]), read_field(quiet.field))
    if outcomes["warp"]["status"] == 0:
        assert (tmp_path / "warp" / "warped.ome.zarr" / "zarr.json").exists()
    if outcomes["qc"]["status"] == 0:
        assert (tmp_path / "qc" / "qc" / "index.html").exists()


def _sigint_blocked_here() -> bool:
    return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_the_local_cluster_talks_tls_and_its_workers_ignore_ctrl_c(prefect_api, monkeypatch):
    """Issue 18 "Also": the local cluster listens with TLS under a key made for it, so a
    client with a key of its own (another user of the machine) is refused; this
    process's clients connect. Item 10: its workers start with SIGINT blocked, so a
    terminal's Ctrl-C reaches only `dreg`. DREG_DASK_TLS=0 turns TLS off."""
    from distributed import Client
    from distributed.security import Security

    from flows.cluster import _OPEN_LOCAL, TLS_VARIABLE, dask_cluster, local_security

    monkeypatch.delenv("DREG_DASK_ADDRESS", raising=False)
    monkeypatch.delenv(TLS_VARIABLE, raising=False)
    with dask_cluster(workers=1) as address:
        assert address.startswith("tls://127.0.0.1:")
        with Client(address, timeout="30s") as client:
            assert list(client.run(_sigint_blocked_here).values()) == [True]
        # Flows run inside it (`register --warp`: the registration, then the warp) use
        # this cluster; a flow run side by side in another thread does not.
        with dask_cluster() as inner:
            assert inner == address
        seen = []
        other = threading.Thread(target=lambda: seen.append(_OPEN_LOCAL.get()))
        other.start()
        other.join()
        assert seen == [None]
        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=Security.temporary(), timeout="5s")
        with pytest.raises((OSError, TimeoutError)):
            Client(address.replace("tls://", "tcp://"),
                   security=Security(require_encryption=False), timeout="5s")
    assert not _sigint_blocked_here()  # only while the cluster starts
    assert _OPEN_LOCAL.get() is None  # closed: the next flow starts its own
    monkeypatch.setenv(TLS_VARIABLE, "0")
    assert local_security() is None


def test_a_command_inside_a_program_stops_only_what_it_started(prefect_api, dask_address):
    """`dreg` called inside a program (here, under the test harness's server, with a
    cluster of the program's own running): its last step leaves the program's API
    server serving and returns at once, instead of stopping that server or waiting for
    the multiprocessing resource tracker that the program's cluster still holds."""
    import urllib.request

    from flows.children import stop_children

    done = threading.Event()
    threading.Thread(target=lambda: (stop_children(), done.set()), daemon=True).start()
    assert done.wait(30), "stop_children waited for processes this command did not start"
    with urllib.request.urlopen(f"{prefect_api.rstrip('/')}/health", timeout=10) as answer:
        assert answer.status == 200
