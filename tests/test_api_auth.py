"""issue 18 item 4: `dreg emit-ingested` sends the Prefect client's credentials
(PREFECT_API_AUTH_STRING, as HTTP basic authentication, as Prefect's own clients do), and
a server that refuses them is one line at once, not a 30 s wait. The server here is a
stand-in that answers as Prefect's server does with PREFECT_SERVER_API_AUTH_STRING set
(401 for missing or wrong credentials)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from cli import main as cli
from flows.events import confirm_delivered, emit_ingested

AUTH = "dreg-operator:n0t-the-default"


@contextlib.contextmanager
def prefect_like_server():
    """An API at http://127.0.0.1:PORT/api that wants `AUTH`; yields (api, seen headers)."""
    seen: list[str | None] = []
    expected = "Basic " + base64.b64encode(AUTH.encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: dict) -> None:
            header = self.headers.get("Authorization")
            seen.append(header)
            status, body = (200, body) if header == expected else (
                401, {"exception_message": "Unauthorized"})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - the http.server interface
            self._answer("3.9.1" if self.path == "/api/admin/version" else {})

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer({"events": [{"id": "x"}]})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("auth", [None, "dreg-operator:wrong"], ids=["none", "wrong"])
def test_refused_credentials_are_one_line_at_once(auth, capsys):
    with prefect_like_server() as (api, seen), temporary_settings(
            {PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}):
        started = time.monotonic()
        status = cli.main(["emit-ingested", "s3://landing/volumes/v.ome.zarr"])
        seconds = time.monotonic() - started
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"dreg: error: {api}: the Prefect API refused the request "
                               "(HTTP 401)")
    assert "PREFECT_API_AUTH_STRING" in lines[0]
    assert AUTH not in err and (auth is None or auth not in err)
    assert seconds < 10, seconds
    assert len(seen) == 1  # the event's one request, refused: nothing was taken


def test_the_auth_string_is_sent_as_prefects_clients_send_it():
    with prefect_like_server() as (api, seen), temporary_settings(
            {PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: AUTH}):
        event = emit_ingested("s3://landing/volumes/v.ome.zarr")
        confirm_delivered(api, event["id"], timeout_s=5)
    assert seen and set(seen) == {"Basic " + base64.b64encode(AUTH.encode()).decode()}


def test_an_unreachable_api_is_one_line_at_once(capsys):
    with prefect_like_server() as (api, _):
        pass  # stopped: nothing answers on its port now
    with temporary_settings({PREFECT_API_URL: api}):
        started = time.monotonic()
        status = cli.main(["emit-ingested", "s3://landing/volumes/v.ome.zarr"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and f"the Prefect API {api} could not be reached" in err[0]
    assert time.monotonic() - started < 15


def emit_in_a_process(api: str, home, extra: dict[str, str]) -> tuple[int, str, str]:
    """`dreg emit-ingested` in a process of its own whose environment names the API, as an
    ingestion system runs it; its exit status, stderr, and the modules it had loaded
    (printed by the process itself, after the command)."""
    code = ("import sys; from cli import main; status = main.main(['emit-ingested', "
            "'s3://landing/volumes/v.ome.zarr']); print('MODULES', *sorted(sys.modules), "
            "file=sys.stderr); sys.exit(status)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=api, PREFECT_HOME=str(home), **extra)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)
    err, _, modules = done.stderr.partition("MODULES")
    return done.returncode, err, modules


def test_with_the_api_in_the_environment_no_prefect_is_imported(tmp_path):
    with prefect_like_server() as (api, seen):
        status, err, modules = emit_in_a_process(
            api, tmp_path, {"PREFECT_API_AUTH_STRING": AUTH})
    assert status == 0, err
    assert seen and set(seen) == {"Basic " + base64.b64encode(AUTH.encode()).decode()}
    # Neither Prefect nor the image libraries: what made a call cost 2 s of CPU.
    loaded = set(modules.split())
    assert not {"prefect", "zarr", "scipy", "numpy"} & loaded, sorted(loaded)


def test_credentials_in_a_prefect_profile_are_used_when_the_server_asks(tmp_path):
    # The environment names the API but not the credentials, which the user keeps in
    # their Prefect profile: the server's refusal makes the command read them from there.
    (tmp_path / "profiles.toml").write_text(
        'active = "ops"\n\n[profiles.ops]\n'
        f'PREFECT_API_AUTH_STRING = "{AUTH}"\n')
    with prefect_like_server() as (api, seen):
        status, err, _ = emit_in_a_process(api, tmp_path, {})
    assert status == 0, err
    basic = "Basic " + base64.b64encode(AUTH.encode()).decode()
    assert seen[0] is None and set(seen[1:]) == {basic}, seen
