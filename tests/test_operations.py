"""Operations end to end, and under load (issue 21): a real `prefect server start` on
PostgreSQL (a server the tests start in a temporary folder, tests/postgres_server.py),
moto's S3 server, the deployments of deployments/prefect.yaml, a process work pool with a
concurrency limit of 2 and its `prefect worker`, a Dask cluster from the `dask scheduler`
and `dask worker` CLIs that every flow run uses (one of its two workers joins once the
first run has completed), ingestion events sent with `dreg emit-ingested`.

One platform (tests/load_platform.py) serves the whole module: the deployments as
deployed, the UI, the database; then a burst of ingest events (3 volumes, 2 duplicates,
2 rejected events), each registered volume checked end to end (its field, its warped
image, its completion event, its run's name); then the nightly batch twice. The burst
and the batches are small so that the suite keeps its time; `bench/burst.py` (40
volumes) and `bench/soak.py` (5 batches of 20 pairs) run the same code at full size and
report the figures.

Run alone with ``pytest -m ops tests/test_operations.py``.
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from contextlib import contextmanager

import load_platform
import postgres_server
import pytest

from dreg import field
from dreg.io import ome_zarr, storage
from dreg.trust import output_name
from flows.artifacts import field_artifact_key, field_link

pytestmark = [pytest.mark.ops, pytest.mark.skipif(
    postgres_server.missing_reason() is not None,
    reason=str(postgres_server.missing_reason()))]

# One rejected event whose URI is refused, one whose content is; bench/burst.py sends all
# five kinds.
BURST = load_platform.Burst(volumes=3, duplicates=2, size=32, late_worker=True,
                            rejected=("outside the allowed prefixes", "not an image"),
                            timeout_s=600)
SOAK_BATCHES = 2


@pytest.fixture(scope="module")
def platform(tmp_path_factory, s3):
    """The platform, its volumes on S3: the reference and the pair's moving volume (for
    the single events), and the burst's volumes."""
    tmp = tmp_path_factory.mktemp("ops")
    inputs = load_platform.write_volumes(s3.uri("ops"), BURST)
    settings = load_platform.burst_settings(tmp, inputs, BURST,
                                            manifest=s3.uri("manifests", "nightly.yaml"))
    pair_folder = storage.join(inputs["allowed"], "pair")
    pair = {name: storage.join(pair_folder, f"{name}.ome.zarr")
            for name in ("fixed", "moving", "truth")}
    with load_platform.platform(tmp, settings, BURST.pool_limit, BURST.dask_workers,
                                BURST.late_worker) as running:
        yield {"api": running.api, "env": running.env, "pair": pair, "s3": s3, "tmp": tmp,
               "inputs": inputs, "running": running}


@contextmanager
def client_for(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            yield client


def test_deployments_do_not_depend_on_the_deploying_checkout(platform):
    with client_for(platform["api"]) as client:
        for name in ("dreg-register-on-ingest/register-on-ingest",
                     "dreg-register-scheduled/register-scheduled"):
            deployment = client.read_deployment_by_name(name)
            assert deployment.pull_steps == [], deployment.pull_steps
            assert not deployment.entrypoint.endswith(".py"), deployment.entrypoint
            # register-on-ingest's limit is raised to the pool's for the burst.
            limit = BURST.pool_limit if "on-ingest" in name else 1
            assert deployment.global_concurrency_limit.limit == limit


def test_cron_deployment_has_its_schedule(platform):
    with client_for(platform["api"]) as client:
        deployment = client.read_deployment_by_name(
            "dreg-register-scheduled/register-scheduled")
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == ["0 2 * * *"]
    assert deployment.parameters["manifest"] == platform["s3"].uri("manifests", "nightly.yaml")


def test_ui_answers_on_the_root_url(platform):
    root = platform["api"][: -len("/api")] + "/"
    with urllib.request.urlopen(root, timeout=10) as response:
        page = response.read().decode()
    assert response.status == 200
    assert "<html" in page.lower() and "prefect" in page.lower()


def test_the_server_keeps_its_state_in_postgresql(platform):
    """issue 21 item 1: the platform's server runs on PostgreSQL, as in production: the
    deployments made by `prefect deploy --all` are rows of its database there."""
    with client_for(platform["api"]) as client:
        deployment = client.read_deployment_by_name(
            "dreg-register-on-ingest/register-on-ingest")
    rows = postgres_server.fetch(platform["running"].database,
                                 "select name from deployment where id = $1",
                                 deployment.id)
    assert rows == [("register-on-ingest",)]


# --- Under load: a burst, then the nightly batch again and again (issue 21 items 2, 3, 5)


@pytest.fixture(scope="module")
def platform_run(platform):
    """The burst, then the nightly batches, on the module's platform (after the single
    events of the tests above)."""
    running, inputs = platform["running"], platform["inputs"]
    outcome = load_platform.burst_on(running, inputs, BURST)
    soak = load_platform.soak_on(running, inputs["reference"], inputs["volumes"][:1],
                                 SOAK_BATCHES, timeout_s=300)
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
    return storage.join(outcome.out, output_name(moving, version))


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
        out = out_of(outcome, uri)
        opened = field.open_field(out + "/field.ome.zarr")
        assert opened.attributes["mapping"] == "fixed_to_moving"
        assert opened.attributes["moving"]["uri"] == uri
        assert opened.attributes["fixed"]["uri"] == outcome.reference
        # The deployments warp by default.
        assert ome_zarr.open_image(out + "/warped.ome.zarr").attributes["complete"] is True
    # The top-level run is named for what it does.
    name = next(e.uri for e in outcome.events if e.kind == "first").rsplit("/", 1)[1]
    assert f"register-{name.removesuffix('.ome.zarr')}-v1" in {r.name for r in outcome.runs}


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
    for event in (e for e in outcome.events if e.kind in BURST.rejected):
        (run,) = [r for r in runs[event.uri] if r.parameters.get("version") == event.version]
        assert run.state.is_failed(), (event.kind, run.state.message)
        assert failures[str(run.id)] == 1, (event.kind, failures)
    # Only the rejected events failed: every failure event is one of theirs, about the
    # volume it names, with the reason; nothing was written for them.
    assert sum(failures.values()) == len(BURST.rejected)
    outside = next(e for e in outcome.events if e.kind == "outside the allowed prefixes")
    (event,) = [e for e in outcome.failed_events
                if e["resource"]["prefect.resource.id"] == f"dreg.volume.{outside.uri}"]
    assert "outside the allowed prefixes" in event["payload"]["reason"]
    fs, out = storage.filesystem(outcome.out)
    assert not [p for p in fs.ls(out) if p.rstrip("/").rsplit("/", 1)[1].startswith(
        ("vol-v1", "notes-v1", "missing-v1", "vol-00-v2"))]


def test_a_dask_worker_that_joins_mid_burst_takes_work(outcome):
    assert sorted(outcome.worker_tasks) == [f"worker-{i}" for i in range(BURST.dask_workers)]
    assert all(count > 0 for count in outcome.worker_tasks.values()), outcome.worker_tasks


def test_the_burst_reports_its_figures(outcome):
    figures = outcome.figures
    print(figures)
    assert figures["runs_completed"] == BURST.volumes + BURST.duplicates
    assert figures["runs_failed"] == len(BURST.rejected)
    assert figures["server_peak_rss_mb"] > 0 and figures["database_mb"] > 0


def test_the_burst_comes_out_exactly_once(outcome):
    assert outcome.figures["exactly_once"] is True, outcome.figures


def test_the_nightly_batch_runs_again_and_again_on_one_platform(platform_run):
    _, soak = platform_run
    assert [row["batch"] for row in soak] == list(range(1, SOAK_BATCHES + 1))
    assert all(row["state"] == "COMPLETED" and row["registered"] == 1 for row in soak), soak
    assert all(row["server_rss_mb"] > 0 and row["scheduler_rss_mb"] > 0 for row in soak)
    assert isinstance(load_platform.growth(soak, "server_rss_mb"), float)


def test_the_dask_scheduler_keeps_no_task_run_after_the_batches(platform_run):
    # With the scheduler's debug logs at docs/operations.md's length, nothing of the
    # burst's and the batches' task runs stays in it (Dask's default keeps each payload,
    # a Prefect task with its run context, and grows about 2 MiB a registration).
    _, soak = platform_run
    assert [row["scheduler_payloads"] for row in soak] == [0] * SOAK_BATCHES, soak
