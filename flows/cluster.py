"""The Dask cluster a registration runs on: an existing one by address, or a local one.

A local cluster has one single-threaded worker process per core. Every worker is warmed
once (elastix's first use costs about 11 s per process) before blocks are sent to it.
The address comes from the caller, else ``DREG_DASK_ADDRESS``; so the same flow runs on
any Dask deployment (dask-kubernetes, dask-jobqueue, Coiled) unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

ADDRESS_VARIABLE = "DREG_DASK_ADDRESS"
WORKERS_VARIABLE = "DREG_DASK_WORKERS"
THREADS_PER_WORKER = 1


def _warm_worker(threads: int = THREADS_PER_WORKER) -> bool:
    """Runs on each worker: set ITK's thread count and pay elastix's first-use cost, and
    load the reduce step's compiled loops (compiled on a machine's first run)."""
    from dreg.memory import release_freed_memory_promptly
    from dreg.registration import elastix
    from dreg.transform import reduce

    global _WARM  # noqa: PLW0603 - one flag per worker process
    if not globals().get("_WARM"):
        release_freed_memory_promptly()
        elastix.warm_up(threads)
        reduce.warm_up()
        _WARM = True
    return True


def warm_up(address: str) -> int:
    """Warm every worker of the cluster at `address`; returns how many there are."""
    from distributed import Client

    with Client(address, timeout="30s") as client:
        done = client.run(_warm_worker)
    return len(done)


def current_api_url() -> str | None:
    """The Prefect API this process reports to (the temporary server, if one started)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


@contextlib.contextmanager
def dask_cluster(address: str | None = None, workers: int | None = None,
                 warm: bool = True) -> Iterator[str]:
    """Yield the address of a Dask cluster, starting a local one if none is given.

    With `warm`, every worker pays elastix's first-use cost first (registration needs
    it; warping, inverting and moving points do not)."""
    address = address or os.environ.get(ADDRESS_VARIABLE) or None
    if address:
        if warm:
            warm_up(address)
        yield address
        return
    from distributed import LocalCluster

    n_workers = workers or int(os.environ.get(WORKERS_VARIABLE) or 0) or os.cpu_count() or 1
    # Workers must report task runs to this flow's API; without this, each would start a
    # temporary server of its own.
    env = {"PREFECT_API_URL": current_api_url() or ""}
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with LocalCluster(
        n_workers=n_workers,
        threads_per_worker=THREADS_PER_WORKER,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.WARNING,
        env=env,
    ) as cluster:
        if warm:
            warm_up(cluster.scheduler_address)
        yield cluster.scheduler_address
