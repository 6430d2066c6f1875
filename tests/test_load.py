"""Operations under load (issue 21 items 2 and 5): a burst of ingest events against the
deployments on a PostgreSQL-backed Prefect server, a process pool of 2, and an external
Dask cluster (`dask scheduler`, `dask worker`) one of whose workers joins mid-burst.

This burst is small (4 volumes, 2 duplicates, 5 rejected events) so that the suite keeps
its time; `bench/burst.py` sends the 40-volume burst through the same code
(tests/load_platform.py) and reports the figures.

Run alone with ``pytest -m ops tests/test_load.py``.
"""

from __future__ import annotations

from collections import Counter

import load_platform
import postgres_server
import pytest

from dreg import field
from dreg.io import storage
from dreg.trust import output_name
from flows.artifacts import field_artifact_key, field_link

pytestmark = [pytest.mark.ops, pytest.mark.skipif(
    postgres_server.missing_reason() is not None,
    reason=str(postgres_server.missing_reason()))]

BURST = load_platform.Burst(volumes=4, duplicates=2, size=32, late_worker=True, timeout_s=600)


SOAK_BATCHES = 2


@pytest.fixture(scope="module")
def platform_run(tmp_path_factory):
    """The burst, then the nightly batches, on one platform."""
    root = tmp_path_factory.mktemp("load")
    inputs = load_platform.write_volumes(root, BURST)
    settings = load_platform.burst_settings(root, inputs, BURST)
    with load_platform.platform(root, settings, BURST.pool_limit, BURST.dask_workers,
                                BURST.late_worker) as running:
        outcome = load_platform.burst_on(running, inputs, BURST)
        soak = load_platform.soak_on(running, root, inputs["reference"],
                                     inputs["volumes"][:1], SOAK_BATCHES, timeout_s=300)
    return outcome, soak


@pytest.fixture(scope="module")
def outcome(platform_run):
    return platform_run[0]


def runs_by_moving(outcome) -> dict[str, list]:
    found: dict[str, list] = {}
    for run in outcome.runs:
        found.setdefault(run.parameters["moving"], []).append(run)
    return found


def out_of(outcome, moving: str, version: str = "v1") -> str:
    prefix = next(e for e in outcome.events if e.kind == "first").uri
    root = prefix.split("/landing/")[0]
    return storage.join(root + "/out", output_name(moving, version))


def test_nothing_is_lost_and_no_run_is_left_waiting(outcome):
    assert len(outcome.runs) == len(outcome.events), outcome.figures
    left = [(r.name, r.state.type.value) for r in outcome.runs if not r.state.is_final()]
    assert left == []
    kinds = Counter(e.kind for e in outcome.events)
    assert kinds["first"] == BURST.volumes and kinds["duplicate"] == BURST.duplicates


def test_every_volume_is_registered_once_with_one_completion_event(outcome):
    firsts = [e.uri for e in outcome.events if e.kind == "first"]
    done = [r for r in outcome.registrations if r.state.is_completed()]
    assert Counter(r.parameters["moving"] for r in done) == Counter(firsts)
    # The one other registration run: the duplicate that started with its volume's first
    # run, refused by the lease before it did anything (its ingest run then waited).
    refused = [r for r in outcome.registrations if not r.state.is_completed()]
    assert all("OwnedElsewhere" in (r.state.message or "") for r in refused), \
        [(r.name, r.state.message) for r in refused]
    assert len(refused) <= 1
    announced = Counter(e["resource"]["prefect.resource.id"] for e in outcome.completed_events)
    wanted = Counter(f"dreg.field.{out_of(outcome, uri)}/field.ome.zarr" for uri in firsts)
    assert announced == wanted
    for uri in firsts:
        opened = field.open_field(out_of(outcome, uri) + "/field.ome.zarr")
        assert opened.attributes["moving"]["uri"] == uri


def test_duplicates_are_no_ops_that_link_to_the_result(outcome):
    runs = runs_by_moving(outcome)
    for event in (e for e in outcome.events if e.kind == "duplicate"):
        pair = [r for r in runs[event.uri] if r.parameters.get("version") == event.version]
        assert len(pair) == 2 and all(r.state.is_completed() for r in pair), \
            [(r.name, r.state.message) for r in pair]
        out = out_of(outcome, event.uri)
        link = field_link(out + "/field.ome.zarr")
        for run in pair:  # the first run's link to the field, and the duplicate's
            links = [a.data for a in outcome.artifacts_by_run.get(str(run.id), [])
                     if a.key == field_artifact_key(out)]
            assert len(links) == 1 and link in links[0], links


def test_rejected_events_fail_with_one_failure_event_each(outcome):
    runs = runs_by_moving(outcome)
    failures = Counter(e["payload"]["flow_run_id"] for e in outcome.failed_events)
    for event in (e for e in outcome.events if e.kind in load_platform.REJECTED_KINDS):
        (run,) = [r for r in runs[event.uri] if r.parameters.get("version") == event.version]
        assert run.state.is_failed(), (event.kind, run.state.message)
        assert failures[str(run.id)] == 1, (event.kind, failures)
    # Only the rejected events failed: every failure event is one of theirs.
    assert sum(failures.values()) == len(load_platform.REJECTED_KINDS)


def test_a_dask_worker_that_joins_mid_burst_takes_work(outcome):
    assert sorted(outcome.worker_tasks) == [f"worker-{i}" for i in range(BURST.dask_workers)]
    assert all(count > 0 for count in outcome.worker_tasks.values()), outcome.worker_tasks


def test_the_burst_reports_its_figures(outcome):
    figures = outcome.figures
    print(figures)
    assert figures["runs_completed"] == BURST.volumes + BURST.duplicates
    assert figures["runs_failed"] == len(load_platform.REJECTED_KINDS)
    assert figures["server_peak_rss_mb"] > 0 and figures["database_mb"] > 0


def test_the_burst_comes_out_exactly_once(outcome):
    assert outcome.figures["exactly_once"] is True, outcome.figures


def test_the_nightly_batch_runs_again_and_again_on_one_platform(platform_run):
    _, soak = platform_run
    assert [row["batch"] for row in soak] == list(range(1, SOAK_BATCHES + 1))
    assert all(row["state"] == "COMPLETED" and row["registered"] == 1 for row in soak), soak
    assert all(row["server_rss_mb"] > 0 and row["scheduler_rss_mb"] > 0 for row in soak)
    assert isinstance(load_platform.growth(soak, "server_rss_mb"), float)
