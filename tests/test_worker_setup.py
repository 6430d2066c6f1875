"""Every Dask worker that ever joins is set up before its first task: real `dask
scheduler` and `dask worker` processes (no nanny, so nothing sets their thread variables
for them), the plugin registered from this process, then a worker started afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import s3_server
from reliability_helpers import BIN, DROPPED_VARIABLES, start, stop, wait_for, wait_for_port

from flows.cluster import THREAD_VARIABLES, configure_workers, worker_state

pytestmark = pytest.mark.slow


def bare_environment() -> dict[str, str]:
    """This environment without thread settings or another cluster's address."""
    return {k: v for k, v in os.environ.items()
            if k not in DROPPED_VARIABLES and k not in THREAD_VARIABLES}


def dask_worker(address: str, name: str, threads: int, log: Path):
    return start([BIN / "dask", "worker", address, "--nthreads", threads, "--no-dashboard",
                  "--no-nanny", "--name", name], bare_environment(), log)


def workers_by_name(address: str) -> dict[str, str]:
    from distributed import Client

    with Client(address, timeout="20s") as client:
        return {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}


def test_a_worker_that_joins_later_is_set_up_before_its_first_task(tmp_path):
    from distributed import Client

    port = s3_server.free_port()
    address = f"tcp://127.0.0.1:{port}"
    started = []
    try:
        scheduler = start([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", port,
                           "--no-dashboard"], bare_environment(), tmp_path / "scheduler.log")
        started.append(scheduler)
        # Started at once: a worker waits for its scheduler to answer.
        first = dask_worker(address, "first", 1, tmp_path / "first.log")
        started.append(first)
        wait_for_port(port, 120, scheduler)
        wait_for(lambda: "first" in workers_by_name(address), 120, "the first worker", first,
                 interval=0.2)
        assert configure_workers(address, warm=True) == 1

        # Several threads, as workers of an external cluster may have.
        later = dask_worker(address, "later", 2, tmp_path / "later.log")
        started.append(later)
        joined = wait_for(lambda: workers_by_name(address).get("later"), 120,
                          "the later worker", later, interval=0.2)
        with Client(address, timeout="20s") as client:
            # Sent as soon as the worker is known: it runs only after the setup.
            first_task = client.submit(worker_state, workers=[joined], pure=False,
                                       allow_other_workers=False).result(timeout=300)
            states = client.run(worker_state)
    finally:
        for process in reversed(started):
            stop(process)

    expected = {"configured": True, "warm": True, "itk_threads": 1, "pool_threads": [1],
                "environ": dict.fromkeys(THREAD_VARIABLES, "1")}
    assert first_task["pid"] == later.pid
    assert {k: first_task[k] for k in expected} == expected, first_task
    for state in states.values():
        assert {k: state[k] for k in expected} == expected, state
