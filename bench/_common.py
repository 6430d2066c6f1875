"""Helpers shared by the benchmark scripts (not a benchmark itself).

Each script prints progress on stderr and exactly one JSON line, last, on stdout. Flows
run as bench/registration.py runs them: a LocalCluster started inside a small Prefect
flow, so that the Prefect API (the temporary one, unless PREFECT_API_URL is set) is up
before the workers start; the workers get PREFECT_API_URL in their environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary API server gets dreg's generous start-up wait, as `dreg` commands do: a
# benchmark on a busy machine measures slowly rather than not at all.
from flows.children import STARTUP_SETTING, STARTUP_TIMEOUT_S  # noqa: E402

os.environ.setdefault(STARTUP_SETTING, str(STARTUP_TIMEOUT_S))


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM ends the script as Ctrl-C does, through its `with` blocks, so that the
    servers and clusters it started (each in a session of its own) are stopped too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(figures: dict) -> None:
    """The one JSON line of figures, last on stdout and the script's last output line:
    what Prefect would otherwise do, and log, at exit is done first."""
    finish_prefect()
    sys.stderr.flush()
    print(json.dumps(figures), flush=True)


def finish_prefect() -> None:
    """Send the logs and events Prefect still has queued and stop the temporary API
    server it started, if any: left to the interpreter's exit, the server's stop logs a
    line after the figures (and logs sent after it would start a new one)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    # Prefect imports its server's module to start the temporary server: when it is not
    # imported, none was started (and importing it, the whole API server, takes about
    # 2.5 CPU-s).
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        server.SubprocessASGIServer().stop()  # the temporary server, if one was started


def prefect_api_kind() -> str:
    """Which Prefect API the flows report to: "temporary" (Prefect's own, started for
    this process: no PREFECT_API_URL) or "external"."""
    return "external" if os.environ.get("PREFECT_API_URL") else "temporary"


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size of this process (or its waited-for children), MiB."""
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def make_pair(out: Path, size: int, seed: int = 1, amplitude: float = 2.0,
              workers: int = 2) -> dict:
    """A `dreg synth` pair of size^3 under `out`, made in a child process (so that its
    memory and threads stay out of the benchmark's process). Returns synth's summary."""
    command = [sys.executable, "-m", "cli.main", "synth", str(out),
               "--shape", f"{size},{size},{size}", "--seed", str(seed),
               "--amplitude", str(amplitude), "--workers", str(workers), "--overwrite"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dreg synth failed: {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_pipeline(transform: str, block: int, overlap: float, parameters: dict,
                   factor: int = 2):
    """A pipeline of one block stage at level 0."""
    from dreg.registration.pipeline import PipelineConfig, StageConfig

    return PipelineConfig(stages=[StageConfig(
        name=transform, level=0, block_size=block, overlap=overlap, transform=transform,
        parameters=parameters, field_grid_factor=factor)])


def in_flow_with_cluster(workers: int, body: Callable, name: str = "dreg-bench",
                         warm: bool = True, modules: tuple[str, ...] | None = None):
    """Run ``body(cluster)`` inside a small Prefect flow, on a LocalCluster of `workers`
    single-threaded worker processes, prepared (`prepare_workers`) before `body` runs.
    `warm=False` skips elastix's first use (the flows that use a finished registration
    do not run elastix); `modules` are what the workers import up front (default:
    the registration's task modules). Returns what `body` returns.

    Where DREG_DASK_ADDRESS names a cluster (as for `dreg` commands on a platform with
    a cluster of its own), that cluster is used as it is, whatever its workers: the
    figures are then that cluster's, not those of `workers` fresh processes."""
    from distributed import LocalCluster
    from prefect import flow

    from flows.cluster import WORKER_RESOURCES, current_api_url

    def prepared(cluster):
        started = time.perf_counter()
        prepare_workers(cluster.scheduler_address, warm,
                        TASK_MODULES if modules is None else modules)
        log(f"worker(s) up{' and warm' if warm else ''} in "
            f"{time.perf_counter() - started:.1f} s")
        return body(cluster)

    @flow(name=name)
    def bench_flow():
        existing = os.environ.get("DREG_DASK_ADDRESS")
        if existing:
            from distributed import Client

            log(f"on the existing cluster {existing}")
            with Client(existing) as client:  # its workers run functions of this module
                client.upload_file(__file__)
            return prepared(SimpleNamespace(scheduler_address=existing))
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.WARNING,
                          env={"PREFECT_API_URL": current_api_url()},
                          resources=WORKER_RESOURCES) as cluster:
            return prepared(cluster)

    return bench_flow()


# What the first task on a worker imports (Prefect among it, about a second): imported
# up front, so that a one-time cost per worker is not counted as per-block time.
TASK_MODULES = ("tasks.register", "tasks.reduce", "tasks.publish", "dreg.registration.block",
                "dreg.registration.reduce")
# The same for the flows that use a finished registration (warp, invert, points).
APPLY_TASK_MODULES = ("tasks.apply", "tasks.publish", "dreg.apply.warp",
                      "dreg.apply.invert", "dreg.apply.points", "dreg.io.pyramid")


def prepare_workers(address: str, warm: bool = True,
                    modules: tuple[str, ...] = TASK_MODULES) -> None:
    """Warm every worker (flows.cluster.warm_up: elastix's first use) unless not `warm`,
    and import `modules` (what the tasks to come run) on every worker."""
    import importlib

    from distributed import Client

    from flows.cluster import warm_up

    if warm:
        warm_up(address)
    with Client(address) as client:
        for module in modules:
            client.run(importlib.import_module, module)


def worker_peak_rss_mb(address: str) -> list[float]:
    """Peak RSS of every worker process of a cluster, MiB, sorted."""
    from distributed import Client

    with Client(address) as client:
        peaks = client.run(peak_rss_mb)
    return sorted(round(v, 1) for v in peaks.values())


def register(pair: dict, out: Path, pipeline, address: str) -> dict:
    """register_images on an existing cluster; returns its result and the wall time."""
    from flows.options import RunOptions
    from flows.registration import register_images

    started = time.perf_counter()
    result = register_images(fixed=pair["fixed"], moving=pair["moving"], out=str(out),
                             pipeline=pipeline,
                             # The registration alone: QC has its own bench (jacobian.py).
                             options=RunOptions(dask_address=address, overwrite=True,
                                                qc=False))
    return {"result": result, "wall": time.perf_counter() - started}


def finished_registration(pair: dict, out: Path, factor: int = 1) -> str:
    """OUT as a finished registration leaves it (result.json and field.ome.zarr), made
    without registering: the synth pair's exact field (truth.ome.zarr, on the fixed grid)
    as the field: copied at spacing factor 1, or at `factor` (a registration's field is
    usually at 2: half the voxels per axis over the same physical extent) sampled from
    the truth chunk by chunk (its voxels on the truth's are copied exactly; the extra
    layer past the last voxel centre holds the border's). Any earlier OUT is removed
    first, so that no output (and no task cache keyed by it) of an earlier run is
    reused."""
    import numpy as np

    from dreg.field import create_field, open_field, sample_field
    from dreg.grid import Grid, vectors_to_components
    from dreg.io import ome_zarr
    from dreg.registration.records import InitialRecord, RegistrationResult

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    field = out / "field.ome.zarr"
    if factor == 1:
        shutil.copytree(pair["truth"], field)
    else:
        truth = open_field(pair["truth"])
        fixed = truth.attributes["fixed"]
        grid = Grid.from_dict(fixed).coarsened(float(factor))
        image = create_field(str(field), grid, fixed=fixed,
                             moving_uri=truth.attributes["moving"]["uri"])
        for region in ome_zarr.chunk_regions(grid.shape_zyx, image.levels[0].chunks_zyx):
            u = sample_field(truth, grid.region_points(region))
            ome_zarr.write_region(image, 0, region,
                                  vectors_to_components(u).astype(np.float32))
    result = RegistrationResult(
        output=str(out), field=str(field), result=str(out / "result.json"),
        fixed=pair["fixed"], moving=pair["moving"], flow_run_id="made-by-the-benchmark",
        initial=InitialRecord(matrix=np.eye(3).tolist(), translation=[0.0] * 3),
        stages=[], seconds=0.0)
    (out / "result.json").write_text(result.document())
    return str(out)


@contextlib.contextmanager
def work_folder(folder: str | None, prefix: str, keep: bool = False) -> Iterator[Path]:
    """The work folder: `folder` (kept), or a temporary one removed on exit unless
    `keep`."""
    if folder is not None:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def task_run_spans(flow_run_id: str, expected: dict[str, int],
                   timeout: float = 60) -> dict[str, dict] | None:
    """Wall span of groups of task runs under a flow run's subflows, from the Prefect
    API: for each name prefix in `expected` (how many task runs it should have once all
    are reported), {"s": last end - first start, "runs": n, "task_s": sum of durations}.
    Waits (up to `timeout`) until every expected run is reported final; None when the
    API cannot tell (then the caller reports the total only)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    def read(client, prefix: str) -> list:
        runs, page = [], 200
        while True:
            batch = client.read_task_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[UUID(flow_run_id)])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=prefix)),
                limit=page, offset=len(runs))
            runs.extend(batch)
            if len(batch) < page:
                return [r for r in runs if r.name.startswith(prefix)]

    deadline = time.monotonic() + timeout
    try:
        with get_client(sync_client=True) as client:
            while True:
                found = {prefix: read(client, prefix) for prefix in expected}
                ready = all(len(found[p]) >= n and all(
                    r.state and r.state.is_final() and r.start_time and r.end_time
                    for r in found[p]) for p, n in expected.items())
                if ready:
                    break
                if time.monotonic() > deadline:
                    log(f"task runs not all reported after {timeout} s: "
                        f"{ {p: len(r) for p, r in found.items()} } of {expected}")
                    return None
                time.sleep(0.5)
    except Exception as exc:  # noqa: BLE001 - a figure we can do without
        log(f"could not read task runs from the Prefect API: {exc}")
        return None
    spans = {}
    for prefix, runs in found.items():
        if not runs:
            spans[prefix] = {"s": 0.0, "runs": 0, "task_s": 0.0}
            continue
        first = min(r.start_time for r in runs)
        last = max(r.end_time for r in runs)
        spans[prefix] = {"s": round((last - first).total_seconds(), 3), "runs": len(runs),
                         "task_s": round(sum((r.end_time - r.start_time).total_seconds()
                                             for r in runs), 3)}
    return spans


def process_role(process) -> str:
    """What a process of this benchmark is: flow, worker, prefect-server, or other."""
    import psutil

    if process.pid == os.getpid():
        return "flow"
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return "other"
    if "uvicorn" in command or "prefect server" in command or "prefect.server" in command:
        return "prefect-server"
    if "spawn_main" in command:
        return "worker"
    return "other"


def cpu_seconds_by_role() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of this process and all its descendants (the
    workers, the Prefect server it started), by pid: {pid: (role, seconds)}."""
    import psutil

    me = psutil.Process()
    processes = [me, *me.children(recursive=True)]
    out = {}
    for process in processes:
        try:
            times = process.cpu_times()
            out[process.pid] = (process_role(process), times.user + times.system)
        except psutil.Error:
            pass
    return out


def cpu_used_by_role(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds used between two `cpu_seconds_by_role` snapshots, summed by role."""
    used: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        used[role] = used.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return {role: round(seconds, 2) for role, seconds in sorted(used.items())}


def _profile_thread_start() -> bool:
    """Runs as a task: profile the worker thread that runs tasks, from now on."""
    import cProfile
    import threading

    profiler = cProfile.Profile()
    threading.current_thread().dreg_profiler = profiler
    profiler.enable()
    return True


def _profile_thread_stop(lines: int) -> str:
    """Runs as a task on the same thread: stop profiling; the top functions as text."""
    import io
    import pstats
    import threading

    profiler = threading.current_thread().__dict__.pop("dreg_profiler", None)
    if profiler is None:
        return "(this worker thread was not profiled)"
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(lines)
    stats.sort_stats("tottime").print_stats(lines)
    return text.getvalue()


@contextlib.contextmanager
def profile_workers(address: str, lines: int = 30) -> Iterator[dict]:
    """cProfile the task thread of every worker (single-threaded workers) while the
    block runs; on exit the yielded dict holds each worker's top functions as text."""
    from distributed import Client

    reports: dict = {}
    with Client(address) as client:
        workers = list(client.scheduler_info()["workers"])
        for worker in workers:
            client.submit(_profile_thread_start, pure=False, workers=[worker]).result()
        try:
            yield reports
        finally:
            for worker in workers:
                reports[worker] = client.submit(_profile_thread_stop, lines, pure=False,
                                                workers=[worker]).result()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def prefect_server(timeout: float = 120) -> Iterator[str]:
    """A real `prefect server start` on a free loopback port, its SQLite database in a
    temporary folder; PREFECT_API_URL points this process (and its children) at it.
    Stopped, and its folder removed, on exit. Call before Prefect is imported."""
    home = Path(tempfile.mkdtemp(prefix="dreg-bench-prefect-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": url}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(home / "server.log", "wb") as server_log:
        server = subprocess.Popen(command, env=env, stdout=server_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        started = time.perf_counter()
        while not _healthy(url):
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"prefect server not healthy after {timeout} s")
            time.sleep(0.5)
        log(f"prefect server up at {url} in {time.perf_counter() - started:.1f} s")
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if "prefect" in sys.modules:  # send the logs still queued while it is up
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(home, ignore_errors=True)
