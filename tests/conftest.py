"""Shared fixtures. The S3 endpoint is a real moto server (see s3_server.py)."""

import pytest
import s3_server
from helpers import DEFAULT_PAIR

from dreg import synth


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server for the session, with a bucket and AWS_*/DREG_S3_* pointing at it."""
    with s3_server.running() as server:
        yield server


@pytest.fixture(scope="module")
def pair(request, tmp_path_factory) -> dict:
    """A synthetic pair with its truth (dreg.synth.write_pair), written once per module:
    the module's PAIR (write_pair's keywords, with `grid`), else DEFAULT_PAIR."""
    settings = dict(getattr(request.module, "PAIR", DEFAULT_PAIR))
    grid = settings.pop("grid")
    return synth.write_pair(str(tmp_path_factory.mktemp("pair")), grid, overwrite=True,
                            **settings)


# Prefect's test harness and a LocalCluster, entered once per session.
from fixtures_prefect import dask_address, dask_client, prefect_api  # noqa: E402, F401

# A real PostgreSQL server per module that asks for it (issue 21 item 1).
from postgres_server import postgres  # noqa: E402, F401

# ----------------------------------------------------------------------------- tiers
# The fast tier (`bash scripts/dev.sh test-fast`, i.e. `-m "not full"`) is the core, the
# CLI's bad-input lines and the layout rule. A test is in the full tier only when it needs
# one of these servers, carries one of these markers, lives in one of these modules, or is
# marked `full` by hand.
SERVER_FIXTURES = {"prefect_api", "dask_address", "dask_client", "s3", "postgres"}
HEAVY_MARKERS = {"slow", "prefect", "ops", "s3", "elastix"}
FULL_MODULES = {
    "test_bench.py": "runs every bench script",
    "test_out_of_core.py": "writes and converts volumes of hundreds of MiB",
    "test_qc.py": "renders the QC pictures and page (matplotlib) in nearly every test",
}


# ------------------------------------------------------------------------------ order
# The suite runs its modules on two processes (`--dist loadfile`), each taking the next
# module when it finishes one, in this order (scripts/dev.sh passes --no-loadscope-reorder:
# by default xdist would hand out the modules with the most tests first). Taken in name
# order, a long module could start last and run alone for minutes; the longest go first
# (by wall seconds in a whole run on 2 cores, 2026-12-03: 302, 206, 165, 145, 125, 123,
# 119, 111, 106, 88, 76, 70, 38, 33, 26, 20),
# so that the two processes finish close together, the short modules filling the end.
LONGEST_FIRST = ("test_bench.py", "test_reliability.py", "test_apply.py",
                 "test_registration.py", "test_dask_cli_cluster.py", "test_processes.py",
                 "test_qc.py", "test_operations.py", "test_out_of_core.py",
                 "test_server_restart.py", "test_copied_output.py", "test_cli_errors.py",
                 "test_worker_setup.py", "test_registration_inputs.py", "test_integrity.py",
                 "test_convert.py")


def _longest_first(item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_longest_first)  # stable: a module's tests keep their order
    for item in items:
        markers = {mark.name for mark in item.iter_markers()}
        if (SERVER_FIXTURES & set(item.fixturenames) or HEAVY_MARKERS & markers
                or item.path.name in FULL_MODULES):
            item.add_marker(pytest.mark.full)
