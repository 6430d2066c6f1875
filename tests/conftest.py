"""Shared fixtures. The S3 endpoint is a real moto server (see s3_server.py)."""

import pytest
import s3_server


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server for the session, with a bucket and AWS_*/DREG_S3_* pointing at it."""
    with s3_server.running() as server:
        yield server


# Prefect's test harness and a warm LocalCluster, entered once per session.
from fixtures_prefect import dask_address, dask_client, prefect_api  # noqa: E402, F401
