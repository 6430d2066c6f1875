"""Operations end to end: a real `prefect server start` on PostgreSQL (a server the
tests start in a temporary folder, tests/postgres_server.py; issue 21 item 1), moto's S3
server, `prefect deploy --all`, a real process worker, ingestion events.

Run alone with ``pytest -m ops``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path

import postgres_server
import pytest
import s3_server
from prefect_queries import events_named, wait_for_events

from dreg import field, synth
from dreg.grid import Grid
from dreg.io import ome_zarr

pytestmark = pytest.mark.ops

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "dreg-process"
RUN_TIMEOUT_S = 420
# The worker's pipeline (DREG_PIPELINE, passed on by the deployments' job variables): the
# built-in pipeline's stages (a global affine at the coarsest level, then B-spline blocks
# at full resolution) with few iterations, so that elastix takes seconds, not a minute.
PIPELINE = """\
stages:
  - name: affine
    level: -1
    transform: affine
    parameters: {MaximumNumberOfIterations: 30}
  - name: bspline
    level: 0
    block_size: 64
    overlap: 0.25
    transform: bspline
    parameters: {MaximumNumberOfIterations: 30}
"""


@contextmanager
def background(args: list[str], env: dict, log: Path, grace_s: float = 5):
    """Run `args` in a process group of its own; on leaving, SIGTERM the group, then
    SIGKILL what is left after `grace_s`. (`prefect worker start` runs the worker in a
    child that does not stop on SIGTERM within tens of seconds.)"""
    with open(log, "wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=ROOT, start_new_session=True)
        try:
            yield process
        finally:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def platform(tmp_path_factory, s3, postgres):
    """Server (on PostgreSQL, as in production: issue 21 item 1), pool, deployments and
    worker, with a reference and a moving volume on S3."""
    tmp = tmp_path_factory.mktemp("ops")
    (tmp / "pipeline.yaml").write_text(PIPELINE)
    port = s3_server.free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "home"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "DREG_REFERENCE": s3.uri("volumes", "pair", "fixed.ome.zarr"),
        "DREG_OUT_PREFIX": s3.uri("registrations"),
        "DREG_ALLOWED_PREFIXES": s3.uri("volumes") + "/",
        "DREG_DASK_WORKERS": "1",
        "DREG_MANIFEST": s3.uri("manifests", "nightly.yaml"),
        "DREG_PIPELINE": str(tmp / "pipeline.yaml"),
    }
    env.pop("DREG_DASK_ADDRESS", None)
    pair = synth.write_pair(s3.uri("volumes", "pair"), Grid((64, 64, 64), (1.0, 1.0, 1.0)),
                            seed=2, amplitude_voxels=1.5)
    server_args = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                   "--port", str(port)]
    with background(server_args, env, tmp / "server.log") as server:
        s3_server.wait_until_answering(f"{api}/health", server, timeout=120)
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type",
                        "process"], env=env, cwd=ROOT, check=True, capture_output=True)
        deploy = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
                                env=env, cwd=ROOT, capture_output=True, text=True)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        worker_args = [str(BIN / "prefect"), "worker", "start", "--pool", POOL,
                       "--limit", "1"]
        with background(worker_args, env, tmp / "worker.log"):
            yield {"api": api, "env": env, "pair": pair, "s3": s3, "tmp": tmp}


@contextmanager
def client_for(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            yield client


def emit(platform: dict, uri: str, version: str) -> float:
    """Announce a volume as the ingestion system would, with `dreg emit-ingested`; returns
    when the event occurred. (A subprocess: no events client lingers in this process
    after the server stops.)"""
    done = subprocess.run([str(BIN / "dreg"), "emit-ingested", uri, "--version", version],
                          env=platform["env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    event = json.loads(done.stdout.strip().splitlines()[-1])
    assert event["event"] == "dreg.volume.ingested"
    assert event["resource"] == f"dreg.volume.{uri}"
    return datetime.fromisoformat(event["occurred"]).timestamp()


def wait_for_run(api: str, moving: str, timeout: float = RUN_TIMEOUT_S):
    """The ingest flow run whose `moving` parameter is `moving`, once it has finished."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    deadline = time.monotonic() + timeout
    with client_for(api) as client:
        deployment = client.read_deployment_by_name("dreg-register-on-ingest/register-on-ingest")
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])))
            for run in runs:
                if run.parameters.get("moving") == moving and run.state.is_final():
                    return run
            time.sleep(0.5)
    raise AssertionError(f"no finished run for {moving} within {timeout} s")


def test_ingestion_event_registers_the_volume(platform):
    api, pair = platform["api"], platform["pair"]
    emitted = emit(platform, pair["moving"], "v1")
    run = wait_for_run(api, pair["moving"])
    assert run.state.is_completed(), run.state.message
    started = run.start_time.timestamp()
    finished = run.end_time.timestamp()
    print(json.dumps({"event_to_run_start_s": round(started - emitted, 1),
                      "event_to_completed_s": round(finished - emitted, 1)}))

    from dreg.trust import output_name
    from flows.artifacts import field_artifact_key

    out = platform["s3"].uri("registrations", output_name(pair["moving"], "v1"))
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client_for(api) as client:
        (artifact, *_) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[field_artifact_key(out)])))
    link = re.search(r"\((s3://[^)]+)\)", artifact.data).group(1)
    assert link == out + "/field.ome.zarr"
    opened = field.open_field(link)
    assert opened.attributes["mapping"] == "fixed_to_moving"
    assert opened.attributes["moving"]["uri"] == pair["moving"]
    assert opened.attributes["fixed"]["uri"] == pair["fixed"]

    # The server stores events asynchronously: give the feed a few seconds.
    wanted = f"dreg.field.{link}"
    wait_for_events(api, "dreg.registration.completed",
                    lambda e: e["resource"]["prefect.resource.id"] == wanted)
    completed = events_named(api, "dreg.registration.completed")
    assert [e["resource"]["prefect.resource.id"] for e in completed] == [wanted]
    # The deployments warp by default, and the top-level run is named for what it does.
    warped = ome_zarr.open_image(out + "/warped.ome.zarr")
    assert warped.attributes["complete"] is True
    assert run.name == "register-moving-v1"


def test_deployments_do_not_depend_on_the_deploying_checkout(platform):
    with client_for(platform["api"]) as client:
        for name in ("dreg-register-on-ingest/register-on-ingest",
                     "dreg-register-scheduled/register-scheduled"):
            deployment = client.read_deployment_by_name(name)
            assert deployment.pull_steps == [], deployment.pull_steps
            assert not deployment.entrypoint.endswith(".py"), deployment.entrypoint
            assert deployment.global_concurrency_limit.limit == 1


def test_cron_deployment_has_its_schedule(platform):
    with client_for(platform["api"]) as client:
        deployment = client.read_deployment_by_name(
            "dreg-register-scheduled/register-scheduled")
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == ["0 2 * * *"]
    assert deployment.parameters["manifest"] == platform["s3"].uri("manifests", "nightly.yaml")


def test_event_outside_the_allowed_prefixes_is_rejected(platform):
    api, s3 = platform["api"], platform["s3"]
    outside = s3.uri("elsewhere", "moving.ome.zarr")
    emit(platform, outside, "v2")
    run = wait_for_run(api, outside, timeout=240)
    assert run.state.is_failed()
    assert "outside the allowed prefixes" in (run.state.message or "")
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    written = client.list_objects_v2(Bucket=s3.bucket, Prefix="registrations/moving-v2")
    assert written.get("KeyCount", 0) == 0
    reasons = [e["payload"]["reason"] for e in wait_for_events(
        api, "dreg.registration.failed",
        lambda e: e["resource"]["prefect.resource.id"] == f"dreg.volume.{outside}")]
    # The failure names the volume it is about.
    assert any("outside the allowed prefixes" in r for r in reasons), reasons


def test_ui_answers_on_the_root_url(platform):
    root = platform["api"][: -len("/api")] + "/"
    with urllib.request.urlopen(root, timeout=10) as response:
        page = response.read().decode()
    assert response.status == 200
    assert "<html" in page.lower() and "prefect" in page.lower()


def test_the_server_keeps_its_state_in_postgresql(platform, postgres):
    """issue 21 item 1: the platform's server runs on PostgreSQL, as in production: the
    deployments made by `prefect deploy --all` are rows of its database there."""
    with client_for(platform["api"]) as client:
        deployment = client.read_deployment_by_name(
            "dreg-register-on-ingest/register-on-ingest")
    rows = postgres_server.fetch(postgres, "select name from deployment where id = $1",
                                 deployment.id)
    assert rows == [("register-on-ingest",)]
