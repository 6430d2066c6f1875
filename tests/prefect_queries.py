"""Reading what a run left in a real Prefect API: its task runs once final, its events."""

from __future__ import annotations

import json
import time
import urllib.request


def final_task_runs(flow_run_filter, name: str, timeout_s: float = 60) -> list:
    """Task runs named `name`* of the flow runs `flow_run_filter` selects, once all are
    final (the API records task-run states asynchronously), or as they are at the
    deadline."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=flow_run_filter,
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))
            if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


def events_named(api: str, name: str) -> list[dict]:
    """The latest events called `name` (up to 50) in the API's event feed."""
    request = urllib.request.Request(
        f"{api.rstrip('/')}/events/filter", method="POST",
        data=json.dumps({"filter": {"event": {"name": [name]}}, "limit": 50}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["events"]


def wait_for_events(api: str, name: str, wanted, timeout_s: float = 60) -> list[dict]:
    """The events called `name` for which `wanted(event)` holds, waiting up to `timeout_s`
    for at least one: the server stores events asynchronously, in batches, so an event
    already sent may not be in the feed yet. Returns [] at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [e for e in events_named(api, name) if wanted(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)
