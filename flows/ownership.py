"""One run at a time owns an output: the lease a flow holds while it writes OUT."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect import get_run_logger
from prefect.runtime import flow_run

from dreg.io import ownership


@contextlib.contextmanager
def owning(out_uri: str) -> Iterator[ownership.Lease]:
    """Hold OUT's lease (renewed in the background) for the block; refuse with the
    owner's run id when another live run holds it."""
    lease = ownership.acquire(out_uri, str(flow_run.get_id()))
    if lease.previous:
        get_run_logger().warning(
            f"{out_uri}: took over the stale lease of run {lease.previous.get('owner')}")
    with lease.keep_alive():
        yield lease
