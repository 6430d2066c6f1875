"""One run at a time owns an output: the lease a flow holds while it writes OUT, and the
fence every write that matters passes first."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from prefect import get_run_logger
from prefect.runtime import flow_run

from dreg.io import ownership, storage

# The leases this process holds, by OUT: the flow and its subflows (same process) fence
# their writes with them.
_HELD: dict[str, ownership.Lease] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def owning(out_uri: str) -> Iterator[ownership.Lease]:
    """Hold OUT's lease (renewed in the background) for the block; refuse with the
    owner's run id when another live run holds it."""
    lease = ownership.acquire(out_uri, str(flow_run.get_id()))
    if lease.previous and not lease.previous.get("released"):
        dead = lease.previous.get("owner")
        if lease.owner_gone:
            get_run_logger().warning(ownership.describe_takeover(lease.uri, lease.previous))
            why = f"its process (pid {lease.previous.get('pid')}) is gone"
        else:
            get_run_logger().warning(f"{out_uri}: took over the stale lease of run {dead}")
            why = "its process stopped renewing the lease"
        mark_crashed(dead, f"{why} on {out_uri}; taken over by run {flow_run.get_id()}")
    with lease.keep_alive(), holding(lease):
        yield lease


@contextlib.contextmanager
def holding(lease: ownership.Lease) -> Iterator[ownership.Lease]:
    """Make `lease` the one `fence` checks writes under its OUT against, for the block."""
    with _HELD_LOCK:
        _HELD[lease.uri] = lease
    try:
        yield lease
    finally:
        with _HELD_LOCK:
            if _HELD.get(lease.uri) is lease:
                del _HELD[lease.uri]


def fence(uri: str, before: str, verify: bool = False) -> None:
    """Raise LeaseLost, naming `before` (what was about to be done), if this process holds
    the lease of the OUT that contains `uri` and no longer owns it. `verify` also reads
    the lease from storage (one read: before a stage, a field's creation or removal);
    otherwise the check is local (before each batch or chunk is submitted)."""
    uri = storage.normalize_uri(uri)
    with _HELD_LOCK:
        held = [lease for out, lease in _HELD.items()
                if uri == out or uri.startswith(out.rstrip("/") + "/")]
    for lease in held:
        if verify:
            lease.verify(before)
        else:
            lease.check(before)


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
