"""The platform under load (issue 21 items 2, 3 and 5): a morning's burst of ingest events
and a soak of nightly batches, shared by tests/test_operations.py (small) and bench/burst.py
and bench/soak.py (full size, figures).

Everything is real and started here: a PostgreSQL server (tests/postgres_server.py), a
`prefect server start` on it, the process work pool with a concurrency limit, the
deployments of deployments/prefect.yaml (register-on-ingest's limit raised to the
pool's), a `prefect worker`, and an external Dask cluster from the `dask scheduler` and
`dask worker` CLIs that every flow run uses (DREG_DASK_ADDRESS). The volumes lie on
local disk: one reference, and `volumes` copies of one moving image of a synthetic pair,
each under its own name (so each is a distinct volume with its own output). Each is
announced with `dreg emit-ingested`, several commands at a time, as an ingestion system
would; then a second event for some of them (duplicates: the first one right after its
volume's first event, so that both runs start together, the others after every first
event), then events that the flow must reject, one of each kind.

`run_burst` returns a `BurstOutcome`: the flow runs, the registration subflow runs, the
completion and failure events, the duplicates' artifacts, and figures. `soak_on` runs
the register-scheduled deployment's nightly batch several times in a row on one platform
and measures the server's and the Dask scheduler's memory after each batch.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import postgres_server
import psutil
import s3_server
import yaml
from reliability_helpers import (
    BIN,
    ROOT,
    Started,
    client_for,
    prefect_server,
    start,
    start_dask_worker,
    stop,
    wait_for,
    wait_for_port,
)

from dreg import synth
from dreg.grid import Grid
from dreg.io import storage
from dreg.layout import RESULT_FILE
from dreg.trust import output_name

POOL = "dreg-process"
DEPLOYMENT = "dreg-register-on-ingest/register-on-ingest"
STARTUP_TIMEOUT_S = 180
# The worker's pipeline: the built-in pipeline's stages (an affine at the coarsest level,
# then B-spline blocks at full resolution) with few iterations, so that a small volume
# registers in seconds.
PIPELINE = """\
stages:
  - name: affine
    level: -1
    transform: affine
    parameters: {MaximumNumberOfIterations: 30}
  - name: bspline
    level: 0
    block_size: 32
    overlap: 0.25
    transform: bspline
    parameters: {MaximumNumberOfIterations: 30}
"""
REJECTED_KINDS = ("outside the allowed prefixes", "missing", "not an image", "too large",
                  "fixed outside the allowed prefixes")


@dataclass(frozen=True)
class Burst:
    """What lands: `volumes` distinct volumes of `size`³, a second event for the first
    `duplicates` of them, and one event of each rejected kind."""

    volumes: int = 40
    duplicates: int = 10
    size: int = 48
    pool_limit: int = 2
    dask_workers: int = 2
    late_worker: bool = False  # start the last Dask worker after the first completion
    kill_worker_after: int = 0  # SIGKILL a Dask worker's process after this many (0: none)
    rejected: tuple[str, ...] = REJECTED_KINDS  # which kinds of rejected event to send
    emitters: int = 4  # `dreg emit-ingested` commands at once
    timeout_s: float = 1800


@dataclass
class Event:
    uri: str
    version: str
    kind: str  # "first", "duplicate" or a rejected kind
    fixed: str | None = None
    occurred: float = 0.0


@dataclass
class BurstOutcome:
    events: list[Event]
    runs: list  # the ingest deployment's flow runs
    registrations: list  # the `dreg-register` subflow runs
    completed_events: list[dict]
    failed_events: list[dict]
    artifacts_by_run: dict  # flow run id -> artifacts it created
    worker_tasks: dict[str, int]  # Dask worker name -> tasks it ran
    out: str  # the output prefix
    reference: str  # the fixed volume of every registration
    figures: dict = field(default_factory=dict)


def write_volumes(root: str, burst: Burst, pair: dict | None = None) -> dict:
    """The reference, the distinct volumes, and the inputs of the rejected events, under
    `root` (a local folder or an s3:// prefix). The volumes are copies of the moving
    image of `pair` (a `synth.write_pair` result; by default one is written)."""
    landing = storage.join(root, "landing")
    grid = Grid((burst.size,) * 3, (1.0, 1.0, 1.0))
    if pair is None:
        pair = synth.write_pair(storage.join(landing, "pair"), grid, seed=5,
                                amplitude_voxels=1.5)
    volumes = []
    for i in range(burst.volumes):
        volumes.append(storage.join(landing, "volumes", f"vol-{i:02d}.ome.zarr"))
        copy_tree(pair["moving"], volumes[-1])
    elsewhere = storage.join(root, "elsewhere", "vol.ome.zarr")
    copy_tree(pair["moving"], elsewhere)
    not_image = storage.join(landing, "volumes", "notes.ome.zarr")
    storage.write_text(storage.join(not_image, "README.txt"), "not an image\n")
    rejected = [
        Event(elsewhere, "v1", REJECTED_KINDS[0]),
        Event(storage.join(landing, "volumes", "missing.ome.zarr"), "v1", REJECTED_KINDS[1]),
        Event(not_image, "v1", REJECTED_KINDS[2]),
        Event(storage.join(landing, "large", "moving.ome.zarr"), "v1", REJECTED_KINDS[3]),
        Event(volumes[0], "v2", REJECTED_KINDS[4], fixed=elsewhere),
    ]
    rejected = [e for e in rejected if e.kind in burst.rejected]
    if REJECTED_KINDS[3] in burst.rejected:
        synth.write_pair(storage.join(landing, "large"),
                         Grid((burst.size + 8,) * 3, (1.0, 1.0, 1.0)), seed=6)
    return {"reference": pair["fixed"], "volumes": volumes, "rejected": rejected,
            "allowed": landing + "/", "out": storage.join(root, "out")}


def copy_tree(source: str, target: str) -> None:
    """Copy a folder (an OME-Zarr image) between locations of the same kind."""
    fs, source_path = storage.filesystem(source)
    _, target_path = storage.filesystem(target)
    fs.copy(source_path.rstrip("/") + "/", target_path, recursive=True)


def deployments_file(target: Path, limit: int) -> Path:
    """deployments/prefect.yaml with register-on-ingest's concurrency limit at `limit`."""
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        if deployment["name"] == "register-on-ingest":
            deployment["concurrency_limit"]["limit"] = limit
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    return target


def _run(args: list, env: dict, what: str, timeout: float = 300) -> str:
    done = subprocess.run([str(a) for a in args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{what}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def dask_worker_tasks(address: str) -> dict[str, int]:
    """Tasks each worker of the cluster has run, by worker name."""
    from distributed import Client

    def executed(dask_worker) -> tuple[str, int]:
        return str(dask_worker.name), int(dask_worker.state.transition_counter)

    with Client(address, timeout=30) as client:
        return dict(client.run(executed).values())


# The scheduler's debug logs, as docs/operations.md tells operators to set them: the
# default keeps the last 1000 message batches sent to each worker, and with them every
# Prefect task run's payload (its task and run context), about 2 MiB a registration.
SCHEDULER_LOG_LENGTH = 0


def scheduler_environment(log_length: int | None) -> dict[str, str]:
    """The variables that set the scheduler's debug logs to `log_length` entries (None:
    Dask's default)."""
    if log_length is None:
        return {}
    return {"DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH": str(log_length)}


def scheduler_payloads(address: str) -> int:
    """The task payloads alive in the scheduler (each a task's function, arguments and,
    for a Prefect task, its run context, pickled for a worker)."""
    from distributed import Client

    def count(dask_scheduler) -> int:
        import gc

        from distributed.protocol.serialize import ToPickle

        gc.collect()
        return sum(isinstance(o, ToPickle) for o in gc.get_objects())

    with Client(address, timeout=30) as client:
        return client.run_on_scheduler(count)


@contextmanager
def dask_cluster(root: Path, env: dict, workers: int, late: bool,
                 log_length: int | None = SCHEDULER_LOG_LENGTH,
                 ) -> Iterator[tuple[str, callable, int]]:
    """`dask scheduler` (its debug logs `log_length` long) and `workers` `dask worker`
    processes (one thread, one `block` resource each). Yields the address, a function
    that starts the held-back worker (when `late`: the last one starts only when it is
    called) and the scheduler's pid."""
    port = s3_server.free_port()
    address = f"tcp://127.0.0.1:{port}"
    started: list[Started] = []

    def start_worker(i: int) -> None:
        started.append(start_dask_worker(address, root, env, f"worker-{i}"))

    try:
        scheduler = start([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", port,
                           "--no-dashboard"],
                          {**env, "HOME": str(root), **scheduler_environment(log_length)},
                          root / "scheduler.log")
        started.append(scheduler)
        first = workers - 1 if late else workers
        for i in range(first):
            start_worker(i)
        wait_for_port(port, STARTUP_TIMEOUT_S, scheduler)
        wait_for(lambda: len(dask_worker_tasks(address)) == first, STARTUP_TIMEOUT_S,
                 "the Dask workers registered", scheduler, interval=1)
        held_back = [workers - 1] if late else []

        def start_late() -> None:
            while held_back:
                start_worker(held_back.pop())

        yield address, start_late, scheduler.pid
    finally:
        for process in reversed(started):
            stop(process)


class TreeSampler:
    """CPU seconds and the peak RSS of a process and its descendants, sampled every
    `interval` seconds in a thread (the CPU of descendants that exit between samples is
    missed: the server's are long-lived)."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss, cpu = 0, 0.0
            for process in self._tree():
                try:
                    rss += process.memory_info().rss
                    times = process.cpu_times()
                    cpu += times.user + times.system
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.cpu = max(self.cpu, cpu)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def all_events(api: str, name: str) -> list[dict]:
    """Every event called `name` in the API's feed (following its pages)."""
    request = urllib.request.Request(
        f"{api.rstrip('/')}/events/filter", method="POST",
        data=json.dumps({"filter": {"event": {"name": [name]}}, "limit": 50}).encode(),
        headers={"Content-Type": "application/json"})
    found = []
    while request is not None:
        with urllib.request.urlopen(request, timeout=30) as response:
            page = json.loads(response.read())
        found.extend(page["events"])
        request = urllib.request.Request(page["next_page"]) if page.get("next_page") else None
    return found


def emit(env: dict, event: Event) -> Event:
    """Announce a volume with `dreg emit-ingested`; records when the event occurred."""
    args = [BIN / "dreg", "emit-ingested", event.uri, "--version", event.version]
    if event.fixed:
        args += ["--fixed", event.fixed]
    output = _run(args, env, f"emit-ingested {event.uri}", timeout=120)
    sent = json.loads(output.strip().splitlines()[-1])
    assert sent["event"] == "dreg.volume.ingested", sent
    from datetime import datetime

    event.occurred = datetime.fromisoformat(sent["occurred"]).timestamp()
    return event


def ingest_runs(api: str) -> list:
    """Every flow run of the register-on-ingest deployment."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with client_for(api) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        runs, offset = [], 0
        while True:
            page = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])),
                offset=offset, limit=200)
            runs.extend(page)
            if len(page) < 200:
                return runs
            offset += len(page)


def registration_runs(api: str) -> list:
    """Every `dreg-register` flow run (the registrations the ingest runs started)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with client_for(api) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["dreg-register"])), limit=200)


def artifacts_of(api: str, run_ids: list) -> dict:
    """The artifacts each of the flow runs `run_ids` created, by run id."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    by_run: dict = {}
    with client_for(api) as client:
        offset = 0
        while True:
            page = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=run_ids)), offset=offset, limit=200)
            for artifact in page:
                by_run.setdefault(str(artifact.flow_run_id), []).append(artifact)
            if len(page) < 200:
                return by_run
            offset += len(page)


@dataclass
class Platform:
    """A running platform: the API, the environment its processes share (the worker's,
    with the deployments' settings), the Dask scheduler's address, and the processes to
    watch."""

    api: str
    env: dict
    address: str
    start_late_worker: callable
    server_pid: int
    scheduler_pid: int
    worker: Started
    database: postgres_server.PostgresServer


@contextmanager
def platform(root: Path, settings: dict, pool_limit: int, dask_workers: int,
             late_worker: bool = False,
             scheduler_log_length: int | None = SCHEDULER_LOG_LENGTH) -> Iterator[Platform]:
    """PostgreSQL, `prefect server start` on it, a Dask cluster from the CLIs (its
    scheduler's debug logs `scheduler_log_length` long), the process pool with
    `pool_limit`, the deployments (register-on-ingest's limit at `pool_limit`) deployed
    with `settings` (DREG_* variables) and a `prefect worker` of the pool."""
    with ExitStack() as stack:
        database = stack.enter_context(postgres_server.running())
        api, env = stack.enter_context(prefect_server(root, timeout=STARTUP_TIMEOUT_S,
                                                      database_url=database.url()))
        address, start_late, scheduler_pid = stack.enter_context(
            dask_cluster(root, env, dask_workers, late_worker, scheduler_log_length))
        env = {**env, **settings, "DREG_DASK_ADDRESS": address,
               "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        _run([BIN / "prefect", "work-pool", "create", POOL, "--type", "process"], env,
             "work-pool create")
        _run([BIN / "prefect", "work-pool", "set-concurrency-limit", POOL, str(pool_limit)],
             env, "work-pool set-concurrency-limit")
        _run([BIN / "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
              deployments_file(root / "prefect.yaml", pool_limit)], env, "deploy")
        worker = start([BIN / "prefect", "worker", "start", "--pool", POOL, "--limit",
                        str(pool_limit)], env, root / "prefect-worker.log")
        stack.callback(stop_worker, worker)
        yield Platform(api, env, address, start_late, _server_pid(api), scheduler_pid,
                       worker, database)


def stop_worker(worker: Started) -> None:
    """Stop the `prefect worker` and the flow-run processes it started (each leads a
    session of its own, so stopping the worker's group leaves them running)."""
    try:
        runs = psutil.Process(worker.pid).children(recursive=True)
    except psutil.Error:
        runs = []
    stop(worker)
    for process in runs:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(runs, timeout=10)


def burst_settings(local: Path, inputs: dict, burst: Burst,
                   manifest: str | None = None) -> dict:
    """The deployments' settings (DREG_* variables) for the burst's volumes; the pipeline
    file is written in the local folder `local`, the nightly manifest is `manifest`
    (default: beside it)."""
    (local / "pipeline.yaml").write_text(PIPELINE)
    return {"DREG_REFERENCE": inputs["reference"], "DREG_OUT_PREFIX": inputs["out"],
            # The nightly batch's manifest names outputs too: they lie under the prefix.
            "DREG_ALLOWED_PREFIXES": f"{inputs['allowed']},{inputs['out']}/",
            "DREG_MAX_VOXELS": str(burst.size ** 3),
            "DREG_PIPELINE": str(local / "pipeline.yaml"),
            "DREG_MANIFEST": manifest or str(local / "manifest.yaml")}


def run_burst(root: Path, burst: Burst) -> BurstOutcome:
    """Start the platform, send the burst, wait until every run has ended; what happened."""
    inputs = write_volumes(str(root), burst)
    with platform(root, burst_settings(root, inputs, burst), burst.pool_limit,
                  burst.dask_workers, burst.late_worker) as running:
        return burst_on(running, inputs, burst)


def burst_on(running: Platform, inputs: dict, burst: Burst) -> BurstOutcome:
    """Send the burst to a running platform and wait until every run has ended."""
    api, env = running.api, running.env
    with TreeSampler(running.server_pid) as sampler:
        events, last_event, began = send_burst(env, inputs, burst)

        killed: list[str] = []

        # The platform may have served other runs before: the burst's are those of its
        # volumes, their outputs and their runs.
        uris = {e.uri for e in events}

        def all_ended() -> list | None:
            runs = [r for r in ingest_runs(api) if r.parameters.get("moving") in uris]
            done = sum(r.state.is_completed() for r in runs)
            if burst.late_worker and done:
                running.start_late_worker()
            if burst.kill_worker_after and not killed and done >= burst.kill_worker_after:
                killed.append(kill_a_worker(running.address))
            if len(runs) == len(events) and all(r.state.is_final() for r in runs):
                return runs
            return None

        runs = wait_for(all_ended, burst.timeout_s, f"{len(events)} ingest runs ended",
                        running.worker, interval=2)
        run_ids = {str(r.id) for r in runs}
        fields = {f"dreg.field.{storage.join(inputs['out'], output_name(e.uri, e.version))}"
                  f"/field.ome.zarr" for e in events}
        completed, failed = _settled_events(api, {
            "dreg.registration.completed": (
                burst.volumes, lambda e: e["resource"]["prefect.resource.id"] in fields),
            "dreg.registration.failed": (
                len(inputs["rejected"]), lambda e: e["payload"].get("flow_run_id") in run_ids),
        })
    outcome = BurstOutcome(
        events=events, runs=runs,
        registrations=[r for r in registration_runs(api) if r.parameters.get("moving") in uris],
        completed_events=completed, failed_events=failed,
        artifacts_by_run=artifacts_of(api, [r.id for r in runs]),
        worker_tasks=dask_worker_tasks(running.address), out=inputs["out"],
        reference=inputs["reference"])
    finishes = [r.end_time.timestamp() for r in runs if r.end_time]
    outcome.figures = {
        "events_in": len(events),
        "volumes": burst.volumes, "duplicates": burst.duplicates,
        "rejected": len(inputs["rejected"]), "size": burst.size,
        "pool_limit": burst.pool_limit, "dask_workers": burst.dask_workers,
        "emit_span_s": round(last_event - min(e.occurred for e in events), 1),
        "firsts_span_s": round(_span([e for e in events if e.kind == "first"]), 1),
        "runs_completed": sum(r.state.is_completed() for r in runs),
        "runs_failed": sum(r.state.is_failed() for r in runs),
        "registrations": len(outcome.registrations),
        "completion_events": len(completed), "failure_events": len(failed),
        "last_event_to_last_completion_s": round(max(finishes) - last_event, 1),
        "first_event_to_last_completion_s": round(max(finishes) - began, 1),
        "server_cpu_s": round(sampler.cpu, 1),
        "server_peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "database_mb": round(database_size(running.database) / 2**20, 1),
        "worker_tasks": outcome.worker_tasks,
        "killed_worker": killed[0] if killed else None,
        "blocks_reused": blocks_reused(inputs["out"]),
        "exactly_once": exactly_once(outcome),
    }
    return outcome


def kill_a_worker(address: str) -> str:
    """SIGKILL the process of the cluster's busiest worker (its nanny starts another);
    returns the worker's name."""
    import os
    import signal

    from distributed import Client

    def who(dask_worker) -> tuple[str, int, int]:
        return (str(dask_worker.name), os.getpid(),
                int(dask_worker.state.executing_count))

    with Client(address, timeout=30) as client:
        workers = sorted(client.run(who).values(), key=lambda w: -w[2])
    name, pid, _ = workers[0]
    os.kill(pid, signal.SIGKILL)
    return name


def blocks_reused(out: str) -> int:
    """Blocks taken from the block store rather than registered, over every finished
    registration under `out` (after a killed worker: those its lost batch had stored)."""
    fs, path = storage.filesystem(out)
    total = 0
    for result in fs.glob(f"{path.rstrip('/')}/*/{RESULT_FILE}"):
        stages = json.loads(fs.cat_file(result))["stages"]
        total += sum(stage.get("reused", 0) for stage in stages)
    return total


def _span(events: list[Event]) -> float:
    """Seconds from the first of `events` to the last, as the server dated them."""
    return max(e.occurred for e in events) - min(e.occurred for e in events)


def exactly_once(outcome: BurstOutcome) -> bool:
    """What a burst must come to: every distinct volume registered once with one
    completion event, every duplicate completed, every rejected event failed with one
    failure event, every run ended."""
    firsts = Counter(e.uri for e in outcome.events if e.kind == "first")
    registered = Counter(r.parameters["moving"] for r in outcome.registrations
                         if r.state.is_completed())
    rejected = [e for e in outcome.events if e.kind in REJECTED_KINDS]
    return (registered == firsts and len(outcome.completed_events) == len(firsts)
            and len(outcome.failed_events) == len(rejected)
            and sum(r.state.is_failed() for r in outcome.runs) == len(rejected)
            and len(outcome.runs) == len(outcome.events)
            and all(r.state.is_final() for r in outcome.runs))


def send_burst(env: dict, inputs: dict, burst: Burst) -> tuple[list[Event], float, float]:
    """Emit the burst's events; returns them, when the last occurred and when the first
    command started."""
    firsts = [Event(uri, "v1", "first") for uri in inputs["volumes"]]
    duplicates = [Event(uri, "v1", "duplicate") for uri in inputs["volumes"][:burst.duplicates]]
    began = time.time()
    with ThreadPoolExecutor(burst.emitters) as pool:
        # The first duplicate goes right after its first event, so that the two runs
        # start together; the others come after every first event.
        for group in ([firsts[0], *duplicates[:1]], firsts[1:], duplicates[1:],
                      inputs["rejected"]):
            list(pool.map(lambda e: emit(env, e), group))
    events = [*firsts, *duplicates, *inputs["rejected"]]
    return events, max(e.occurred for e in events), began


def database_size(database: postgres_server.PostgresServer) -> int:
    """Bytes the Prefect database takes on its server."""
    return postgres_server.fetch(database, "select pg_database_size(current_database())")[0][0]


def _server_pid(api: str) -> int:
    """The pid of the `prefect server start` that serves `api` (its port is unique)."""
    port = api.rsplit(":", 1)[1].split("/", 1)[0]
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "server" in cmdline and "start" in cmdline and port in cmdline:
            return process.info["pid"]
    raise AssertionError(f"no `prefect server start` on port {port}")


def _settled_events(api: str, expected: dict, timeout_s: float = 60) -> list[list[dict]]:
    """For each event name of `expected` (name: (count, which)), the events so called
    for which `which` holds, once at least `count` of each are in the feed (the server
    stores events asynchronously) and a few seconds more have brought no new one (so
    that a doubled event would show)."""
    def read() -> list[list[dict]]:
        return [[e for e in all_events(api, name) if which(e)]
                for name, (_, which) in expected.items()]

    counts = [count for count, _ in expected.values()]
    deadline = time.monotonic() + timeout_s
    found = read()
    while time.monotonic() < deadline:
        time.sleep(3)
        again = read()
        if (all(len(a) >= n for a, n in zip(again, counts, strict=True))
                and [len(a) for a in again] == [len(f) for f in found]):
            return again
        found = again
    return found


SCHEDULED = "dreg-register-scheduled/register-scheduled"


def soak_on(running: Platform, reference: str, movings: list[str],
            batches: int, timeout_s: float = 3600) -> list[dict]:
    """Run the nightly batch `batches` times in a row through the register-scheduled
    deployment: each time its manifest (DREG_MANIFEST) lists every moving volume onto the
    reference, into outputs of that batch. After each batch: its state and seconds, the
    registrations it finished, the RSS of the server (with its children) and of the
    Dask scheduler, and the task payloads the scheduler still holds."""
    from uuid import UUID

    manifest = running.env["DREG_MANIFEST"]
    out = running.env["DREG_OUT_PREFIX"]
    rows = []
    for batch in range(1, batches + 1):
        outputs = [storage.join(out, f"batch-{batch}",
                                m.rstrip("/").rsplit("/", 1)[1].removesuffix(".ome.zarr"))
                   for m in movings]
        entries = [{"fixed": reference, "moving": m, "out": o}
                   for m, o in zip(movings, outputs, strict=True)]
        storage.replace_text(manifest, yaml.safe_dump(entries))
        with client_for(running.api) as client:
            deployment = client.read_deployment_by_name(SCHEDULED)
            run_id = client.create_flow_run_from_deployment(deployment.id).id

        def ended(run_id=run_id):
            with client_for(running.api) as client:
                run = client.read_flow_run(UUID(str(run_id)))
            return run if run.state.is_final() else None

        run = wait_for(ended, timeout_s, f"nightly batch {batch}", running.worker, interval=2)
        rows.append({
            "batch": batch, "state": run.state.type.value,
            "seconds": round((run.end_time - run.start_time).total_seconds(), 1),
            "registered": sum(storage.exists(storage.join(o, RESULT_FILE)) for o in outputs),
            "server_rss_mb": round(tree_rss(running.server_pid) / 2**20, 1),
            "scheduler_rss_mb": round(tree_rss(running.scheduler_pid) / 2**20, 1),
            "scheduler_payloads": scheduler_payloads(running.address),
        })
    return rows


def tree_rss(pid: int) -> int:
    """Bytes resident in a process and its descendants now."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def growth(rows: list[dict], key: str) -> float:
    """How much `key` grew from the first batch to the last, in per cent of the first."""
    first, last = rows[0][key], rows[-1][key]
    return round(100 * (last - first) / first, 1)
