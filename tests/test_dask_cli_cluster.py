"""A real multi-process cluster from the Dask CLIs, sharing nothing but S3 and the API.

`dask scheduler` and two `dask worker` processes run as separate processes, each worker
with a temporary directory and HOME of its own, as on separate machines. The fixed and
moving images, OUT and the Prefect result storage (a RemoteFileSystem block that
`dreg register` saves for an s3:// OUT) all live on the moto S3 server; the workers get
its endpoint and credentials, and PREFECT_API_URL of the session's Prefect server (the
test harness's, a real server in a process of its own), in their environment, nothing
else. The field must equal, bit for bit, that of the same
registration on a LocalCluster; and again after one worker process is SIGKILLed
mid-stage (its nanny starts a new one; Dask reruns the lost tasks).

The pair is small (40³, blocks of 16: 27 blocks) and registered by the exact registrar
(reliability_helpers.PIPELINE; the workers import it from tests/, which their
environment puts on PYTHONPATH), so that the module runs in a few minutes on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import s3_server
from reliability_helpers import (
    BIN,
    PIPELINE,
    STAGE,
    child_environment,
    finish,
    read_field,
    start,
    start_dask_worker,
    stop,
    wait_for,
    wait_for_port,
)

from dreg import synth
from dreg.grid import Grid

pytestmark = [pytest.mark.slow, pytest.mark.s3]

SHAPE = (40, 40, 40)
BLOCKS = 27
INTERRUPT_AT = 3          # blocks stored on S3 before a worker is killed
RUN_TIMEOUT_S = 420
STARTUP_TIMEOUT_S = 180


def report(name: str, figures: dict) -> None:
    print(json.dumps({name: figures}))


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3, prefect_api):
    """The session's Prefect server (the test harness's, a real one); yields (API URL,
    environment for children, with S3's)."""
    env = child_environment(tmp_path_factory.mktemp("prefect"), prefect_api)
    env.update(s3_server.environment(s3.endpoint_url))
    return prefect_api, env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, s3):
    """A synthetic pair written straight onto S3, and the pipeline YAML."""
    root = tmp_path_factory.mktemp("inputs")
    pair = synth.write_pair(s3.uri("dask-cli", "pair"), Grid(SHAPE, (1.0, 1.0, 1.0)), seed=5,
                            chunks=16, overwrite=True)
    assert pair["fixed"].startswith("s3://") and pair["moving"].startswith("s3://")
    pipeline = root / "pipeline.yaml"
    pipeline.write_text(PIPELINE)
    return {"fixed": pair["fixed"], "moving": pair["moving"], "pipeline": pipeline}


def register_args(inputs: dict, out: str, *extra: str) -> list:
    return [BIN / "dreg", "register", inputs["fixed"], inputs["moving"], out,
            "--config", inputs["pipeline"], "--no-qc", *extra]


def stored_count(out: str) -> int:
    """How many blocks the stage has stored on S3 so far (their records, written last)."""
    from dreg.io import storage

    fs, path = storage.filesystem(f"{out}/stages/{STAGE}/blocks")
    try:
        return sum(name.endswith(".json") for name in fs.ls(path, refresh=True, detail=False))
    except FileNotFoundError:
        return 0


def worker_pids(address: str) -> dict[str, int]:
    """Worker process id by worker name."""
    from distributed import Client

    with Client(address, timeout="20s") as client:
        # Each worker answers with its own name, so a worker that joins between two
        # calls to the scheduler cannot leave a process without a name.
        answers = client.run(_name_and_pid)
    return dict(answers.values())


def _name_and_pid(dask_worker) -> tuple[str, int]:
    return dask_worker.name, os.getpid()


def both_workers(address: str) -> dict[str, int] | None:
    pids = worker_pids(address)
    return pids if len(pids) == 2 else None


@pytest.fixture(scope="module")
def local_run(server, inputs, s3):
    """The registration on a LocalCluster of two workers that the flow starts (run in
    this process, whose environment points at S3, as the workers' does then)."""
    from dreg.registration.pipeline import load_pipeline
    from flows.options import RunOptions
    from flows.registration import register_images

    out = s3.uri("dask-cli", "out-local")
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("DREG_DASK_ADDRESS", raising=False)
        result = register_images(inputs["fixed"], inputs["moving"], out,
                                 load_pipeline(inputs["pipeline"]),
                                 options=RunOptions(workers=2, qc=False))
    seconds = time.monotonic() - started
    assert result.field.startswith("s3://")
    assert sum(result.block_counts["bspline"].values()) == BLOCKS
    report("dask_cli_local_cluster_run", {"seconds": round(seconds, 1),
                                          "block_counts": result.block_counts})
    return {"field": read_field(result.field), "block_counts": result.block_counts,
            "stored": stored_count(out)}


@pytest.fixture(scope="module")
def cli_cluster(server, tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes (nanny, one thread, one `block`
    resource each), every worker with its own working directory, temporary folder and
    HOME; yields the scheduler's address. Shared by the tests of this module, in order:
    the second one kills a worker process, which its nanny replaces."""
    _, env = server
    root = tmp_path_factory.mktemp("cli-cluster")
    port = s3_server.free_port()
    address = f"tcp://127.0.0.1:{port}"
    started = []
    try:
        scheduler = start([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", port,
                           "--no-dashboard"], {**env, "HOME": str(root / "scheduler")},
                          root / "scheduler.log")
        started.append(scheduler)
        # The workers start at once: a worker waits for its scheduler to answer.
        for i in range(2):
            started.append(start_dask_worker(address, root, env, f"worker-{i}"))
        wait_for_port(port, STARTUP_TIMEOUT_S, scheduler)
        wait_for(lambda: both_workers(address), STARTUP_TIMEOUT_S, "both workers registered",
                 scheduler, interval=1)
        yield address
    finally:
        for process in reversed(started):
            stop(process)


def test_dask_cli_cluster_on_s3_equals_the_local_cluster(inputs, s3, local_run, cli_cluster):
    """Scheduler and workers from the Dask CLIs, everything on S3: the same field. (The
    flow runs in this process; `dreg register --dask-address` drives the next test's.)"""
    from dreg.registration.pipeline import load_pipeline
    from flows.options import RunOptions
    from flows.registration import register_images

    out = s3.uri("dask-cli", "out-cli")
    started = time.monotonic()
    result = register_images(inputs["fixed"], inputs["moving"], out,
                             load_pipeline(inputs["pipeline"]),
                             options=RunOptions(dask_address=cli_cluster, qc=False))
    report("dask_cli_cluster_run", {"seconds": round(time.monotonic() - started, 1),
                                    "block_counts": result.block_counts})
    assert result.field.startswith(out)
    assert result.block_counts == local_run["block_counts"]
    np.testing.assert_array_equal(read_field(result.field), local_run["field"])


def test_dask_cli_cluster_survives_a_sigkilled_worker(server, inputs, s3, local_run,
                                                      cli_cluster, tmp_path):
    """SIGKILL of one worker process mid-stage: its nanny starts another, Dask reruns
    what was lost, and the run completes with the same field."""
    _, env = server
    out = s3.uri("dask-cli", "out-cli-killed")
    before = worker_pids(cli_cluster)
    run = start(register_args(inputs, out, "--dask-address", cli_cluster), env,
                tmp_path / "register.log")
    try:
        wait_for(lambda: stored_count(out) >= INTERRUPT_AT, RUN_TIMEOUT_S,
                 "blocks stored before the worker is killed", run)
        at_kill = stored_count(out)
        os.kill(before["worker-0"], signal.SIGKILL)
        killed_at = run.elapsed()
        status = finish(run, RUN_TIMEOUT_S)
        seconds = run.elapsed()
    finally:
        stop(run)
    assert status == 0, run.output()[-3000:]
    line = run.last_json()
    report("dask_cli_cluster_sigkilled_worker", {
        "worker_killed_at_s": round(killed_at, 1), "blocks_stored_at_kill": at_kill,
        "run_seconds": round(seconds, 1), "block_counts": line["block_counts"]})
    assert at_kill < local_run["stored"]  # killed mid-stage, not after it
    after = wait_for(lambda: both_workers(cli_cluster), STARTUP_TIMEOUT_S,
                     "the killed worker replaced")
    assert after["worker-0"] != before["worker-0"]
    assert line["block_counts"] == local_run["block_counts"]
    np.testing.assert_array_equal(read_field(line["field"]), local_run["field"])
