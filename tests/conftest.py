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
