"""Session fixtures for flow tests: Prefect's test harness (a real temporary server,
entered once) and one LocalCluster whose workers report to it."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import prefect_db
import pytest


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (the test harness's temporary server) for the whole session."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import prefect.testing.utilities as harness

    from flows.cluster import current_api_url

    # The harness makes its database in a folder of its own (mkdtemp): hand it one that
    # holds a migrated copy, so that its server starts without running the migrations
    # (about 9 s of CPU in each test process).
    folder = Path(tempfile.mkdtemp(prefix="dreg-test-harness-"))
    prefect_db.seeded(folder / "prefect-test.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "mkdtemp", lambda: str(folder))
        # A generous start-up timeout: a loaded machine is slow.
        with harness.prefect_test_harness(server_startup_timeout=240):
            yield current_api_url()


@pytest.fixture(scope="session")
def dask_address(prefect_api):
    """A LocalCluster of two single-threaded worker processes, set up as a run sets them
    up. Not warmed: most flow tests use the exact registrar, and a worker loads elastix
    when its first elastix block needs it (as in a registration run)."""
    import dask
    from distributed import LocalCluster

    from flows.cluster import LOCAL_CLUSTER_CONFIG, WORKER_RESOURCES, configure_workers

    with dask.config.set(LOCAL_CLUSTER_CONFIG), LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.WARNING,
        env={"PREFECT_API_URL": prefect_api},
        resources=WORKER_RESOURCES,
    ) as cluster:
        configure_workers(cluster.scheduler_address, warm=False)
        yield cluster.scheduler_address


@pytest.fixture
def dask_client(dask_address):
    from distributed import Client

    with Client(dask_address) as client:
        yield client
