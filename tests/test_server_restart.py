"""The Prefect server restarted under a running registration (issue 21 item 4).

A real `prefect server start` on PostgreSQL (tests/postgres_server.py, as production runs
it) is stopped with SIGTERM
while `dreg register` runs its blocks, and started again on the same port and database.
The run must complete, its flow runs end Completed on the restarted server, and its
completion event be stored exactly once. Prefect's own events client drops an event it
could not send during an outage; dreg sends its outcome events over HTTP until the
server takes them (`flows.events.emit_outcome`), which the second test checks directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3_server
from exact_registrar import open_hold
from prefect_queries import wait_for_events
from reliability_helpers import (
    BIN,
    STAGE,
    child_environment,
    exact_pipeline,
    finish,
    flow_run,
    registration_runs,
    start,
    stop,
    stored_blocks,
    wait_for,
)

from dreg import synth
from dreg.grid import Grid

pytestmark = pytest.mark.slow

BLOCKS = 27                 # 48³ in blocks of 16³
STOP_AT = 4                 # blocks stored before the server is stopped
FREE = 16                   # blocks that may run before the server is back (the rest wait)
SERVER_START_TIMEOUT_S = 150
RUN_TIMEOUT_S = 420


def pipeline(hold: Path) -> str:
    """Half a second a block; the first FREE blocks run (those after STOP_AT while the
    server is down, some 4 s of blocks on two workers), the others are held until the
    server is back (exact_registrar's `hold`), so the stop and restart land mid-stage
    however long they take."""
    return exact_pipeline(0.5) + f"      hold: {hold}\n      free: {FREE}\n"


class Server:
    """`prefect server start` on one port and one database, which can be stopped and
    started again."""

    def __init__(self, root: Path, database_url: str) -> None:
        self.root = root
        self.port = s3_server.free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = child_environment(root, self.api)
        self.env.update({"PREFECT_UI_API_URL": self.api,
                         "PREFECT_API_DATABASE_CONNECTION_URL": database_url})
        self.process = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.process = start([BIN / "prefect", "server", "start", "--host", "127.0.0.1",
                              "--port", self.port], self.env,
                             self.root / f"prefect-server-{self.starts}.log")
        s3_server.wait_until_answering(f"{self.api}/health", self.process.process,
                                       timeout=SERVER_START_TIMEOUT_S)

    def terminate(self) -> None:
        """SIGTERM, as a service manager stops it; then whatever is left is killed."""
        self.process.process.terminate()
        try:
            self.process.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        stop(self.process)
        self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres):
    """One server for the module: each test leaves it running (restarted) at its end."""
    running = Server(tmp_path_factory.mktemp("server"), postgres.url())
    running.start()
    yield running
    if running.process is not None:
        running.terminate()


def completion_events(api: str, flow_run_id: str) -> list[dict]:
    return wait_for_events(api, "dreg.registration.completed",
                           lambda e: e["payload"]["flow_run_id"] == flow_run_id)


def test_a_server_restart_mid_run_loses_nothing(server, tmp_path):
    """issue 21 item 4: SIGTERM of the Prefect server mid-stage, then a start on the
    same database: the run completes with every block, its flow runs are Completed on
    the server, and its completion event is stored once."""
    pair = synth.write_pair(str(tmp_path / "pair"), Grid((48, 48, 48), (1.0, 1.0, 1.0)),
                            seed=3, chunks=24)
    hold = tmp_path / "hold"
    hold.mkdir()
    config = tmp_path / "pipeline.yaml"
    config.write_text(pipeline(hold))
    out = tmp_path / "out"
    env = {**server.env, "DREG_DASK_WORKERS": "2"}
    run = start([BIN / "dreg", "register", pair["fixed"], pair["moving"], out, "--config",
                 config, "--no-qc"], env, tmp_path / "register.log")
    try:
        wait_for(lambda: len(stored_blocks(out, STAGE)) >= STOP_AT, RUN_TIMEOUT_S,
                 f"{STOP_AT} stored blocks", run)
        server.terminate()
        stopped_at = len(stored_blocks(out, STAGE))
        down = time.monotonic()
        server.start()
        outage = time.monotonic() - down
        back_at = len(stored_blocks(out, STAGE))
        open_hold(hold)
        status = finish(run, RUN_TIMEOUT_S)
    finally:
        stop(run)
    assert status == 0, run.output()[-3000:]
    line = run.last_json()
    assert line["block_counts"]["bspline"] == {"ok": BLOCKS}
    assert (out / "result.json").exists()
    assert stopped_at < BLOCKS, "the stage ended before the server was stopped"
    assert back_at <= FREE < BLOCKS, "blocks ran past the hold"
    runs = registration_runs(server.api, out)
    assert [str(r.id) for r in runs] == [line["flow_run_id"]]
    assert flow_run(server.api, line["flow_run_id"]).state.type.value == "COMPLETED"
    completed = completion_events(server.api, line["flow_run_id"])
    time.sleep(3)  # a second copy, were one sent, would be stored by now
    completed = completion_events(server.api, line["flow_run_id"])
    assert len(completed) == 1, completed
    print(json.dumps({"server_restart": {"blocks_stored_at_stop": stopped_at,
                                         "blocks_stored_at_restart": back_at,
                                         "outage_s": round(outage, 1),
                                         "run_s": round(run.elapsed(), 1)}}))


SEND_DURING_OUTAGE = """
import json
import flows.events as events
print(json.dumps({"sending": True}), flush=True)
event = events.emit_outcome("dreg.test.outage", {"prefect.resource.id": "dreg.test"}, [], {})
print(json.dumps({"delivered": str(event.id)}), flush=True)
"""


def test_an_event_emitted_while_the_server_is_down_is_sent_again(server, tmp_path):
    """issue 21 item 4: an outcome event emitted while the server is down (Prefect's
    events client would give up on it) is stored once the server is back, once."""
    server.terminate()
    sender = start([sys.executable, "-c", SEND_DURING_OUTAGE], server.env,
                   tmp_path / "sender.log")
    try:
        wait_for(lambda: '"sending"' in sender.output(), 60, "the event emitted", sender)
        # The server stays down a moment longer, and all the while it starts again.
        time.sleep(1)
        server.start()
        assert finish(sender, 240) == 0, sender.output()[-3000:]
    finally:
        stop(sender)
    event_id = sender.last_json()["delivered"]
    found = wait_for_events(server.api, "dreg.test.outage", lambda e: e["id"] == event_id)
    time.sleep(3)
    found = wait_for_events(server.api, "dreg.test.outage", lambda e: e["id"] == event_id)
    assert len(found) == 1, found
