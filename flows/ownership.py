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
    if lease.previous and not lease.previous.get("released"):
        dead = lease.previous.get("owner")
        get_run_logger().warning(f"{out_uri}: took over the stale lease of run {dead}")
        mark_crashed(dead, f"its process stopped renewing the lease on {out_uri}; taken "
                           f"over by run {flow_run.get_id()}")
    with lease.keep_alive():
        yield lease


def mark_crashed(run_id: str | None, message: str) -> None:
    """A flow run whose process died (SIGKILL, a lost machine) stays Running in the API
    forever: once its lease is found stale, record it as Crashed, if still not final."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.states import Crashed

    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(str(run_id)))
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            for each in [run, *children]:
                if each.state is None or not each.state.is_final():
                    client.set_flow_run_state(each.id, Crashed(message=message), force=True)
    except Exception as exc:  # noqa: BLE001 - bookkeeping: never fail the new run for it
        get_run_logger().warning(f"could not mark run {run_id} crashed: {exc}")
