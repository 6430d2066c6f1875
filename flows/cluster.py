"""The Dask cluster a registration runs on: an existing one by address, or a local one.

A local cluster has one single-threaded worker process per core. Every worker that ever
joins the cluster (at the start, restarted by its nanny after a crash, or added later
by an autoscaler or by hand) is configured by a Dask worker plugin before it runs a
task: one thread for ITK, OpenMP and BLAS (results do not depend on thread counts,
so they stay bit-identical however workers come and go) and the run's environment.
Elastix's first-use cost (11 to 25 s and about 740 MB per process) can be paid up front
(`warm`); a registration leaves it to the first block a worker registers, so that a
run whose blocks are all stored never loads elastix.
The address comes from the caller, else ``DREG_DASK_ADDRESS``; so the same flow runs on
any Dask deployment (dask-kubernetes, dask-jobqueue, Coiled) unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import sys
import threading
from collections.abc import Iterator
from multiprocessing import resource_tracker

import dask
from distributed.diagnostics.plugin import WorkerPlugin

from flows.children import sigint_blocked

ADDRESS_VARIABLE = "DREG_DASK_ADDRESS"
WORKERS_VARIABLE = "DREG_DASK_WORKERS"
# A local cluster talks TLS unless this is 0 (see `local_security`).
TLS_VARIABLE = "DREG_DASK_TLS"
THREADS_PER_WORKER = 1
# Read by OpenMP, MKL, OpenBLAS and ITK when they start their thread pools.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
PLUGIN_NAMES = {True: "dreg-worker-setup-elastix", False: "dreg-worker-setup"}
# Each block task holds one unit, and each worker offers one: a worker registers one
# block at a time however many threads it has, so heavy blocks never share its memory.
BLOCK_RESOURCE = "block"
WORKER_RESOURCES = {BLOCK_RESOURCE: 1}
# Dask's defaults for a local cluster's processes, changed where they cost CPU for no use
# here: every server (scheduler, nanny, worker) checks its event loop every 20 ms, and a
# worker samples its task thread's stack every 10 ms for the dashboard's profile, which a
# local cluster does not serve. Idle, a cluster of two workers and its scheduler used
# 11 % of a core with them and 3 % without (measured on 2 cores). A loop blocked for
# longer than the 3 s limit is still reported.
LOCAL_CLUSTER_CONFIG = {"distributed.admin.tick.interval": "500ms",
                        "distributed.worker.profile.enabled": False}

_STATE = {"configured": False, "warm": False}  # per worker process
_LOCK = threading.Lock()
# The local cluster that `dask_cluster` started and has not yet closed, in this context:
# the flows that a command or a flow runs one after another (register, then warp) use it
# instead of each starting and stopping one of their own. A context variable, so that
# flows run side by side in other threads never see it.
_OPEN_LOCAL: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dreg_open_local_cluster", default=None)


def configure_process(threads: int = THREADS_PER_WORKER, warm: bool = True) -> None:
    """Set this process's thread counts and, with `warm`, pay elastix's first-use cost.

    Idempotent and thread-safe: a worker with several threads, or a plugin registered
    again by the next run, configures the process once."""
    with _LOCK:
        if not _STATE["configured"]:
            from threadpoolctl import threadpool_limits

            from dreg.process import enable_stack_dumps, release_freed_memory_promptly

            # The variables reach libraries that start later; pools already running (NumPy's
            # BLAS in every Dask worker) are limited here.
            threadpool_limits(limits=threads)
            release_freed_memory_promptly()
            enable_stack_dumps()  # `kill -USR1` shows where a worker waits
            _STATE["configured"] = True
        if warm and not _STATE["warm"]:
            from dreg.registration import elastix, reduce

            elastix.warm_up(threads)  # also sets ITK's global default thread count
            reduce.warm_up()  # the reduce step's compiled loops
            _STATE["warm"] = True


class WorkerSetup(WorkerPlugin):
    """Configures each worker that joins the cluster, before it runs any task.

    Dask runs `setup` on every worker present when the plugin is registered and on
    every worker that joins afterwards; a worker handles no task until it returns.
    """

    idempotent = False  # registering again (the next run) re-applies it: cheap once warm

    def __init__(self, warm: bool, environ: dict[str, str] | None = None,
                 threads: int = THREADS_PER_WORKER):
        self.warm = warm
        self.threads = threads
        self.environ = {**{name: str(threads) for name in THREAD_VARIABLES},
                        **(environ or {})}

    async def setup(self, worker) -> None:
        os.environ.update(self.environ)
        # Warming takes seconds: off the event loop, so the worker keeps answering.
        await asyncio.get_running_loop().run_in_executor(
            None, configure_process, self.threads, self.warm)


def worker_state() -> dict:
    """What a worker's setup did, as seen from inside the worker (for checks)."""
    from threadpoolctl import threadpool_info

    state = {**_STATE, "pid": os.getpid(),
             "environ": {name: os.environ.get(name) for name in THREAD_VARIABLES},
             "pool_threads": sorted({p["num_threads"] for p in threadpool_info()})}
    if "itk" in sys.modules:  # elastix was warmed, or a block loaded it
        import itk

        state["itk_threads"] = int(itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads())
    return state


# How long a client waits for a scheduler to answer.
CONNECT_TIMEOUT = "30s"


@contextlib.contextmanager
def connected(address: str):
    """A Dask client of the scheduler at `address`; InputError naming the address when
    no scheduler answers there (a typo, or a cluster that is down), not a traceback."""
    from distributed import Client

    from dreg.errors import InputError

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except OSError:
        raise InputError(f"Dask cluster {address} (--dask-address or {ADDRESS_VARIABLE}): "
                         f"no scheduler answered within {CONNECT_TIMEOUT}") from None
    with client:
        yield client


def configure_workers(address: str, warm: bool = True, environ: dict | None = None) -> int:
    """Register the worker setup on the cluster at `address`: it runs now on every
    worker (this waits for them) and on every worker that joins later. Returns how many
    workers there are now; raises RuntimeError naming a worker whose setup failed, and
    InputError naming `address` when no scheduler answers there."""
    with connected(address) as client:
        replies = client.register_plugin(WorkerSetup(warm, environ), name=PLUGIN_NAMES[warm])
    failed = {w: r for w, r in (replies or {}).items() if r.get("status") != "OK"}
    if failed:
        worker, reply = next(iter(failed.items()))
        raise RuntimeError(f"setting up Dask worker {worker} failed: {reply.get('exception')}")
    return len(replies or {})


def warm_up(address: str) -> int:
    """Warm every worker of the cluster at `address`, now and as they join; returns how
    many there are now."""
    return configure_workers(address, warm=True)


def worker_count(address: str) -> int:
    """How many workers the cluster at `address` has now (at least 1): what batches of
    chunks are cut for."""
    with connected(address) as client:
        return max(1, len(client.scheduler_info(n_workers=-1)["workers"]))


def block_workers(address: str) -> int:
    """How many workers of the cluster at `address` can take block tasks. Raises
    InputError when none declares the block resource: block tasks would wait forever."""
    from dreg.errors import InputError

    with connected(address) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
    able = sum(1 for w in workers if w.get("resources", {}).get(BLOCK_RESOURCE, 0) >= 1)
    if not able:
        raise InputError(
            f"Dask cluster {address}: no worker offers the '{BLOCK_RESOURCE}' resource "
            f"({len(workers)} workers); start workers with "
            f"`dask worker {address} --nthreads 1 --resources {BLOCK_RESOURCE}=1`"
        )
    return able


def current_api_url() -> str | None:
    """The Prefect API this process reports to (the temporary server, if one started)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def _run_environment() -> dict[str, str]:
    # Workers must report task runs to this flow's API; without it, each would start a
    # temporary server of its own.
    api = current_api_url()
    return {"PREFECT_API_URL": api} if api else {}


def environment_workers() -> int | None:
    """The local cluster's workers from DREG_DASK_WORKERS (None when unset or empty);
    InputError naming the variable when it is not a whole number from 1 to MAX_WORKERS."""
    from dreg.trust import bounded_setting
    from flows.options import MAX_WORKERS

    return bounded_setting(WORKERS_VARIABLE, int, 1, MAX_WORKERS,
                           f"a whole number from 1 to {MAX_WORKERS}")


def local_security():
    """TLS for a local cluster, with a key and certificate made for it in memory (Dask's
    `Security.temporary`): only this process and the cluster's own processes hold the
    key, so another user of the machine can neither submit work to the workers nor read
    what passes between them. None (plain TCP) when DREG_DASK_TLS is 0."""
    if os.environ.get(TLS_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    from distributed.security import Security

    return Security.temporary()


def _client_config(security) -> dict:
    """Dask settings under which every client this process opens (ours, and Prefect's
    task runner) connects with `security`; nothing to change for plain TCP."""
    if security is None:
        return {}
    return {"distributed.comm.require-encryption": True,
            "distributed.comm.tls.ca-file": security.tls_ca_file,
            "distributed.comm.tls.client.cert": security.tls_client_cert,
            "distributed.comm.tls.client.key": security.tls_client_key}


@contextlib.contextmanager
def dask_cluster(address: str | None = None, workers: int | None = None,
                 warm: bool = False) -> Iterator[str]:
    """Yield the address of a Dask cluster, starting a local one if none is given.

    A local cluster listens on 127.0.0.1 with TLS (`local_security`); while inside, this
    process's Dask clients use its key. A cluster given by address is used as it is.
    Every worker, now or later, is set up by `WorkerSetup`; with `warm`, it also pays
    elastix's first-use cost first (registration needs it; warping, inverting and
    moving points do not). Inside another `dask_cluster` that started a local cluster,
    with no address given, that cluster is used: a command that registers and then
    warps starts one."""
    address = address or os.environ.get(ADDRESS_VARIABLE) or _OPEN_LOCAL.get()
    environ = _run_environment()
    if address:
        configure_workers(address, warm, environ)
        yield address
        return
    from distributed import LocalCluster

    n_workers = workers or environment_workers() or os.cpu_count() or 1
    security = local_security()
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # The cluster's event loop thread starts here, and the nannies start (and restart)
    # their workers from threads it creates: all with SIGINT blocked, so a terminal's
    # Ctrl-C reaches only this process, which closes the cluster in order. The
    # multiprocessing resource tracker unblocks SIGINT in the thread that first starts
    # it, so it is started before.
    resource_tracker.ensure_running()
    with sigint_blocked(), dask.config.set(LOCAL_CLUSTER_CONFIG):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=THREADS_PER_WORKER,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.WARNING,
            env={**{name: str(THREADS_PER_WORKER) for name in THREAD_VARIABLES}, **environ},
            resources=WORKER_RESOURCES,
            security=security,
        )
    with cluster, dask.config.set(_client_config(security)):
        configure_workers(cluster.scheduler_address, warm, environ)
        opened = _OPEN_LOCAL.set(cluster.scheduler_address)
        try:
            yield cluster.scheduler_address
        finally:
            _OPEN_LOCAL.reset(opened)
