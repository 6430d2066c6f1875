"""Reliability with real processes and real signals.

Everything is real: `dreg register` runs as a subprocess leading its own process group
(its LocalCluster's nanny and worker processes belong to that group), reporting to a
real `prefect server start` (on a PostgreSQL server that the tests start in a temporary
folder, as production runs it: tests/postgres_server.py) so that flow-run and task-run
states can be read after a process has been killed; an external cluster is started with
the `dask scheduler` and `dask worker` CLIs. The pair is made with `dreg.synth`.

The pipeline is one stage of 16-voxel blocks on a 64³ pair: 64 blocks, registered by
the exact registrar at 0.15 s each (no elastix: the tests are about
processes, not registration), long enough to be interrupted mid-stage. The
uninterrupted run they are compared with is made in this process, on the session's
cluster: the exact registrar's field is the same wherever it runs. That a joining
worker sets elastix's threads up before its first block is checked in
test_worker_setup.py.

Each test prints one JSON line of its figures (seconds from the start of the process);
all of them are also written to ``<pytest basetemp>/reliability-figures.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from uuid import UUID

import numpy as np
import postgres_server
import pytest
import s3_server
from exact_registrar import METHOD
from reliability_helpers import (
    BIN,
    PIPELINE,
    STAGE,
    block_name,
    describe,
    finish,
    flow_run,
    group_members,
    group_signal_answers,
    prefect_server,
    read_field,
    registration_runs,
    run_to_end,
    start,
    stop,
    stored_blocks,
    subflow_runs,
    wait_for,
    wait_for_port,
    wait_group_gone,
)

from dreg import synth
from dreg.grid import Grid

pytestmark = pytest.mark.slow

BLOCKS = 64
KILL_AT = 8              # blocks stored before the whole run is killed
INTERRUPT_AT = 4         # ... before a worker is killed or the leader is signalled
SETTLE_S = 0.3           # a pause between the two snapshots of stored blocks
MID_STAGE_TIMEOUT_S = 300
RUN_TIMEOUT_S = 420
EXIT_TIMEOUT_S = 60      # a signalled leader must exit within this
GRACE_S = 10             # after which nothing of its process group may be left
FIGURES: dict[str, dict] = {}


def report(name: str, figures: dict) -> None:
    FIGURES[name] = figures
    print(json.dumps({name: figures}))


@pytest.fixture(scope="module", autouse=True)
def figures_file(tmp_path_factory):
    yield
    path = Path(tmp_path_factory.getbasetemp()) / "reliability-figures.json"
    path.write_text(json.dumps(FIGURES, indent=2))


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres):
    """A real Prefect server on PostgreSQL, as in production (issue 21 item 1); yields
    (API URL, environment for children)."""
    with prefect_server(tmp_path_factory.mktemp("prefect"),
                        database_url=postgres.url()) as running:
        yield running


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A synthetic 64³ pair (chunks of 32), and the pipeline YAML."""
    root = tmp_path_factory.mktemp("inputs")
    pair = synth.write_pair(str(root / "pair"), Grid((64, 64, 64), (1.0, 1.0, 1.0)), seed=3,
                            chunks=32)
    (root / "pipeline.yaml").write_text(PIPELINE)
    return {"fixed": pair["fixed"], "moving": pair["moving"],
            "pipeline": root / "pipeline.yaml"}


def register_args(inputs: dict, out: Path, *extra: str) -> list:
    return [BIN / "dreg", "register", inputs["fixed"], inputs["moving"], out,
            "--config", inputs["pipeline"], "--workers", "2", "--no-qc", *extra]


def mid_stage(out: Path, at_least: int):
    """The stage's stored blocks once at least `at_least` are, else None."""
    found = stored_blocks(out, STAGE)
    return found if len(found) >= at_least else None


@pytest.fixture(scope="module")
def reference(inputs, dask_address, tmp_path_factory) -> dict:
    """An uninterrupted registration of the same pair with the same pipeline (in this
    process, on the session's two-worker cluster): its field, counts and time."""
    from dreg.registration.pipeline import load_pipeline
    from flows.options import RunOptions
    from flows.registration import register_images

    out = tmp_path_factory.mktemp("reference") / "out"
    started = time.monotonic()
    result = register_images(inputs["fixed"], inputs["moving"], str(out),
                             load_pipeline(inputs["pipeline"]),
                             options=RunOptions(dask_address=dask_address, qc=False))
    seconds = time.monotonic() - started
    figures = {"seconds": round(seconds, 1), "flow_seconds": result.seconds,
               "block_counts": result.block_counts,
               "blocks_stored": len(stored_blocks(out, STAGE))}
    report("uninterrupted_run", figures)
    assert sum(result.block_counts["bspline"].values()) == BLOCKS
    return {"field": read_field(result.field), "block_counts": result.block_counts,
            "blocks_stored": figures["blocks_stored"], "seconds": seconds}


def test_sigkill_of_the_whole_run_then_resume(server, postgres, inputs, tmp_path, request):
    """SIGKILL of the `dreg register` process group mid-stage: nothing survives, nothing
    looks complete; the same command completes, reusing every finished block, and gives
    exactly the uninterrupted run's field.

    The killed run's lease on OUT is still live, but its owner died on this very machine
    (same host and boot, its pid gone): the same command takes OUT over at once, saying
    that the killed run is no longer running, never telling to stop it (issue 18 item
    12). The uninterrupted reference run (another OUT) is made afterwards.

    Issue 21 item 1: the module's server runs on PostgreSQL, as in production: the
    resumed run's flow run is a Completed row of its database there, the killed one's a
    Crashed row.

    A block is stored when its record is written (after its residual): every block
    stored SETTLE_S before the kill must be reused, and no block that was not stored at
    the kill may be."""
    from dreg.io import ownership

    api, env = server
    out = tmp_path / "out"
    args = register_args(inputs, out)
    first = start(args, env, tmp_path / "first.log")
    try:
        wait_for(lambda: mid_stage(out, KILL_AT), MID_STAGE_TIMEOUT_S,
                 "blocks stored before the kill", first)
        settled = stored_blocks(out, STAGE)
        time.sleep(SETTLE_S)
        members_before = len(group_members(first.pgid))
        os.killpg(first.pgid, signal.SIGKILL)
        killed_at = first.elapsed()
        at_kill = stored_blocks(out, STAGE)
        first.process.wait(timeout=30)
        left = describe(wait_group_gone(first.pgid, GRACE_S))
        killpg_answers = group_signal_answers(first.pgid, GRACE_S)
    finally:
        stop(first)

    assert members_before >= 3, "the group should hold the leader and its Dask processes"
    assert not left, f"processes of the killed group survived: {left}"
    assert not (out / "result.json").exists()
    assert 0 < len(settled) <= len(at_kill) < BLOCKS

    (killed_run,) = registration_runs(api, out)
    lease = ownership.read_owner(str(out))
    assert lease is not None and lease["owner"] == str(killed_run.id)
    assert not ownership.is_stale(lease)  # live: without the pid check, a minute's wait
    lease_wait = 0.0

    second, resume_seconds = run_to_end(args, env, tmp_path / "second.log", RUN_TIMEOUT_S)
    assert (out / "result.json").exists()
    # It says whose lease it took over, and why; it never says to stop a dead run.
    assert f"run {killed_run.id} (pid {lease['pid']} on this machine) is no longer running; " \
           "taking over its output" in second.output()
    assert "stop it" not in second.output()
    reference = request.getfixturevalue("reference")
    line = second.last_json()
    table = json.loads((out / "stages" / STAGE / "blocks.json").read_text())
    reused = {"-".join(map(str, row["index"])) for row in table if row["reused"]}
    settled_blocks = {block_name(n) for n in settled}
    at_kill_blocks = {block_name(n) for n in at_kill}

    report("sigkill_group_then_resume", {
        "first_run_killed_at_s": round(killed_at, 1),
        "group_processes_at_kill": members_before,
        "blocks_stored_settled_before_kill": len(settled),
        "blocks_stored_at_kill": len(at_kill),
        "killpg_0_answers_after_grace": killpg_answers,
        "killed_flow_run_state": flow_run(api, killed_run.id).state.type.value,
        "further_wait_for_the_lease_s": round(lease_wait, 1),
        "resume_seconds": round(resume_seconds, 1),
        "uninterrupted_seconds": round(reference["seconds"], 1),
        "blocks_reused": line["blocks_reused"],
        "stored_at_kill_not_reused": sorted(at_kill_blocks - reused),
    })
    assert len(table) == BLOCKS
    # The killed run no longer shows as Running: the run that took its lease over
    # recorded it as Crashed.
    assert flow_run(api, killed_run.id).state.type.value == "CRASHED"
    assert line["blocks_reused"] == {"bspline": len(reused)}
    # A block's record is written last: every block stored before the kill is reused,
    # and nothing else is.
    assert settled_blocks <= reused <= at_kill_blocks, (settled_blocks, reused, at_kill_blocks)
    assert line["block_counts"] == reference["block_counts"]
    np.testing.assert_array_equal(read_field(line["field"]), reference["field"])
    rows = postgres_server.fetch(
        postgres, "select id, state_type from flow_run where id = any($1::uuid[])",
        [UUID(line["flow_run_id"]), killed_run.id])
    assert {str(i): state for i, state in rows} == {line["flow_run_id"]: "COMPLETED",
                                                     str(killed_run.id): "CRASHED"}


def worker_pids(address: str) -> set[int]:
    from distributed import Client

    with Client(address, timeout="20s") as client:
        return set(client.run(os.getpid).values())


def test_a_worker_killed_and_a_new_one_joining_mid_run(server, inputs, reference, tmp_path):
    """SIGKILL of one of two workers of an external cluster mid-stage, then a new worker
    joins: it is set up (one thread) before its first block, takes blocks, and the run
    completes with a field bit-identical to the uninterrupted run's. Workers run without
    a nanny (so the killed one is not replaced) and without thread variables, so only the
    worker plugin sets them up."""
    from distributed import Client

    from flows.cluster import THREAD_VARIABLES, worker_state

    api, env = server
    bare = {k: v for k, v in env.items() if k not in THREAD_VARIABLES}
    port = s3_server.free_port()
    address = f"tcp://127.0.0.1:{port}"
    out = tmp_path / "out"
    started = []

    def worker(name: str):
        process = start([BIN / "dask", "worker", address, "--nthreads", "1", "--no-dashboard",
                         "--resources", "block=1", "--no-nanny", "--name", name], bare,
                        tmp_path / f"{name}.log")
        started.append(process)
        return process

    try:
        scheduler = start([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", port,
                           "--no-dashboard"], bare, tmp_path / "scheduler.log")
        started.append(scheduler)
        # The workers start at once: a worker waits for its scheduler to answer.
        first, second = worker("worker-0"), worker("worker-1")
        wait_for_port(port, 120, scheduler)
        wait_for(lambda: worker_pids(address) == {first.pid, second.pid}, 180,
                 "both workers registered", scheduler, interval=0.5)

        run = start(register_args(inputs, out, "--dask-address", address), env,
                    tmp_path / "register.log")
        started.append(run)
        wait_for(lambda: mid_stage(out, INTERRUPT_AT), MID_STAGE_TIMEOUT_S,
                 "blocks stored before the worker is killed", run)
        at_kill = len(stored_blocks(out, STAGE))
        os.kill(first.pid, signal.SIGKILL)
        killed_at = run.elapsed()
        first.process.wait(timeout=30)
        joining = worker("worker-2")
        at_join = len(stored_blocks(out, STAGE))
        status = finish(run, RUN_TIMEOUT_S)
        seconds = run.elapsed()
        with Client(address, timeout="20s") as client:
            states = client.run(worker_state)
            executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    finally:
        for process in reversed(started):
            stop(process)

    assert status == 0, run.output()[-3000:]
    line = run.last_json()
    by_pid = {state["pid"]: (address, state) for address, state in states.items()}
    joined_address, joined = by_pid[joining.pid]
    report("worker_killed_and_one_joining", {
        "worker_killed_at_s": round(killed_at, 1),
        "blocks_stored_at_kill": at_kill,
        "blocks_stored_when_the_new_worker_started": at_join,
        "tasks_run_by_the_new_worker": executed[joined_address],
        "run_seconds": round(seconds, 1),
        "uninterrupted_seconds": round(reference["seconds"], 1),
    })
    assert set(by_pid) == {second.pid, joining.pid}
    for _, state in by_pid.values():
        # Both were set up before they registered blocks, each with one thread.
        assert state["configured"] and state["pool_threads"] == [1]
        assert state["environ"] == dict.fromkeys(THREAD_VARIABLES, "1")
    assert executed[joined_address] > 0, "the new worker ran no task"
    assert line["block_counts"] == reference["block_counts"]
    np.testing.assert_array_equal(read_field(line["field"]), reference["field"])


FINAL_FAILURE_STATES = {"CANCELLED", "CRASHED", "FAILED"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_the_leader(server, inputs, signum, tmp_path):
    """SIGINT or SIGTERM to the `dreg register` process alone, mid-stage: it exits within
    a minute, leaving none of its group (Dask nanny and worker processes) behind, its
    flow run final (Cancelled, Crashed or Failed), and no result.json."""
    from dreg.io import ownership

    api, env = server
    out = tmp_path / "out"
    run = start(register_args(inputs, out), env, tmp_path / "register.log")
    status = None
    try:
        wait_for(lambda: mid_stage(out, INTERRUPT_AT), MID_STAGE_TIMEOUT_S,
                 "blocks stored before the signal", run)
        at_signal = len(stored_blocks(out, STAGE))
        members = describe(group_members(run.pgid))
        os.kill(run.pid, signum)
        sent_at = run.elapsed()
        try:
            status = run.process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        exit_seconds = run.elapsed() - sent_at
        left = describe(wait_group_gone(run.pgid, GRACE_S))
        killpg_answers = group_signal_answers(run.pgid, GRACE_S)
    finally:
        stop(run)

    (top,) = registration_runs(api, out)
    # The state is set by the exiting process itself; give the API a moment.
    deadline = time.monotonic() + 15
    while not top.state.is_final() and time.monotonic() < deadline:
        time.sleep(0.5)
        top = flow_run(api, top.id)
    stages = [s for s in subflow_runs(api, top.id) if s.name.startswith("stage-")]
    report(f"signal_{signal.Signals(signum).name}", {
        "signalled_at_s": round(sent_at, 1),
        "residuals_at_signal": at_signal,
        "group_processes_at_signal": len(members),
        "exit_status": status,
        "exit_seconds": round(exit_seconds, 1),
        "left_after_grace": left,
        "killpg_0_answers_after_grace": killpg_answers,
        "flow_run_state": f"{top.state.type.value} ({top.state.name}): {top.state.message}",
        "stage_run_states": [s.state.type.value for s in stages],
        "result_json": (out / "result.json").exists(),
        "lease_left_live": bool((lease := ownership.read_owner(str(out)))
                                and not ownership.is_stale(lease)),
    })
    assert status is not None, f"still running {EXIT_TIMEOUT_S} s after the signal"
    # Interrupted, never "failed" (1) or "bad input" (2): 130 from the CLI, or the signal.
    assert status in (130, -signum, 128 + signum), f"exit status {status}"
    assert not left, f"processes of its group outlived it: {left}"
    assert top.state.type.value in FINAL_FAILURE_STATES, (
        f"flow run {top.id} left {top.state.type.value} ({top.state.name})")
    assert not (out / "result.json").exists()


def test_a_full_disk_is_a_clear_error_and_the_freed_run_resumes(server, tmp_path):
    """OUT on a 120 KiB tmpfs: the run stops with one line naming the file and the cause,
    leaves nothing complete-looking, and completes once the disk has room."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    _, env = server
    try:
        synth.write_pair(str(tmp_path / "pair"), Grid((32, 32, 32), (1.0, 1.0, 1.0)),
                         chunks=16)
        pipeline = tmp_path / "translation.yaml"
        pipeline.write_text("stages:\n  - name: t\n    level: 0\n    block_size: 16\n"
                            f"    transform: translation\n    method: {METHOD}\n"
                            "    parameters: {MaximumNumberOfIterations: 20}\n")
        out = mount / "out"
        args = [str(BIN / "dreg"), "register", str(tmp_path / "pair" / "fixed.ome.zarr"),
                str(tmp_path / "pair" / "moving.ome.zarr"), str(out), "--config",
                str(pipeline), "--workers", "1", "--no-qc"]
        full = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        assert full.returncode == 2, full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if line.startswith("dreg: error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], errors
        assert str(out) in errors[0]
        assert not (out / "result.json").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        # The failed run could not write its release record on the full disk, so its lease
        # is still live; but its process is gone from this machine, so the next run takes
        # OUT over at once (issue 18 item 12), saying so.
        from dreg.io import ownership

        lease = ownership.read_owner(str(out))
        assert lease is not None and not ownership.is_stale(lease)
        freed = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        assert freed.returncode == 0, freed.stderr[-3000:]
        assert f"(pid {lease['pid']} on this machine) is no longer running; taking over " \
               "its output" in freed.stderr
        assert (out / "result.json").exists()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


