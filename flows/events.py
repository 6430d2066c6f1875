"""The events registration listens to and announces (emitted by the flows; the
deployments' triggers match them).

Upstream, the ingestion system announces a new volume:

    event     dreg.volume.ingested
    resource  {"prefect.resource.id": "dreg.volume.<uri>", "dreg.uri": <uri>,
               "dreg.version": <version>}
    payload   {"uri": <uri>, "version": <version>, "fixed": <reference uri, optional>}

`emit_ingested` (or ``dreg emit-ingested URI``) sends it. The `register-on-ingest`
deployment's trigger turns each such event into one flow run.

Downstream, a registration announces its outcome:

    dreg.registration.completed  resource dreg.field.<field uri>; related: the fixed and
                                 moving volumes (roles "fixed", "moving"), the output;
                                 payload: output, field, result, flow run id,
                                 failed blocks (count, share of all blocks), the
                                 QC verdict (qc: ok, warn or null; qc_reason)
    dreg.registration.failed     resource dreg.registration.<output uri>; related as
                                 above; payload: reason, flow run id
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dreg.errors import InputError, RunFailed, redact

if TYPE_CHECKING:
    from dreg.registration import RegistrationResult

INGESTED = "dreg.volume.ingested"
COMPLETED = "dreg.registration.completed"
FAILED = "dreg.registration.failed"
DELIVERY_TIMEOUT_S = 30.0
# How long a run's outcome event is sent again while the server does not answer (a
# restart of the server takes tens of seconds).
RESEND_TIMEOUT_S = 180.0
# How an interrupt (SIGINT, or SIGTERM as Prefect raises it) shows in a wrapped error.
INTERRUPT_MARKERS = ("KeyboardInterrupt", "TerminationSignal")
DEFAULT_CLOUD_API = "https://api.prefect.cloud/api"


def configured_api() -> str | None:
    """The Prefect API this process talks to, as Prefect's settings resolve it (the
    environment, a profile, a .env or prefect.toml file; a flow run's own settings).
    Where Prefect is not loaded yet, PREFECT_API_URL in the environment is taken as it
    is, as Prefect would take it, so that a command that only sends an event does not
    import Prefect (about 1 s of CPU a call)."""
    if "prefect.settings" not in sys.modules and (api := os.environ.get("PREFECT_API_URL")):
        return api
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _credentials(from_settings: bool) -> dict[str, str] | None:
    """The credentials Prefect's own clients send: HTTP basic authentication with
    PREFECT_API_AUTH_STRING (a self-hosted server started with
    PREFECT_SERVER_API_AUTH_STRING), else a bearer PREFECT_API_KEY (Prefect Cloud).
    From the environment only unless `from_settings`; None when it sets neither."""
    if from_settings:
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

        auth, key = PREFECT_API_AUTH_STRING.value(), PREFECT_API_KEY.value()
    else:
        auth = os.environ.get("PREFECT_API_AUTH_STRING")
        key = os.environ.get("PREFECT_API_KEY")
        if auth is None and key is None:
            return None
    if auth:
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    if key:
        return {"Authorization": f"Bearer {key}"}
    return {}


def _refused(api: str, status: int, credentials: dict[str, str]) -> Exception:
    if credentials.get("Authorization", "").startswith("Basic "):
        cause = "the credentials in PREFECT_API_AUTH_STRING are not the server's"
    else:
        cause = ("set PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING "
                 "(or PREFECT_API_KEY for Prefect Cloud)")
    return InputError(f"{api}: the Prefect API refused the request (HTTP {status}): {cause}")


def _unreachable(api: str, exc: OSError) -> str:
    """Why the API at `api` could not be reached, in a few words."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"the Prefect API {api} answered HTTP {exc.code} {exc.reason}"
    reason = getattr(exc, "reason", None) or exc
    return (f"the Prefect API {api} could not be reached "
            f"({getattr(reason, 'strerror', None) or reason})")


def _request(api: str, path: str, data: bytes | None, timeout: float,
             credentials: dict[str, str]) -> bytes:
    request = urllib.request.Request(
        f"{api.rstrip('/')}/{path}", data=data, method="POST" if data is not None else "GET",
        headers={"Content-Type": "application/json", **credentials})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _call(api: str, path: str, data: bytes | None = None, timeout: float = 10) -> bytes:
    """One request to the API with the client's credentials: the answer's body; the
    refusal of the credentials (401, 403) as one InputError line, at once.

    Where Prefect is loaded already (in a flow run), its settings give the credentials.
    Elsewhere the environment does; only when it sets none and the server refuses are
    Prefect's settings read, and the request made again with what they hold."""
    from_settings = "prefect.settings" in sys.modules
    credentials = _credentials(from_settings)
    try:
        return _request(api, path, data, timeout, credentials or {})
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            raise
        refusal = exc.code
    if credentials is None and (credentials := _credentials(from_settings=True)):
        try:
            return _request(api, path, data, timeout, credentials)
        except urllib.error.HTTPError as exc:
            if exc.code not in (401, 403):
                raise
            refusal = exc.code
    raise _refused(api, refusal, credentials or {})


def confirm_delivered(api: str, event_id: str, timeout_s: float = DELIVERY_TIMEOUT_S) -> None:
    """Wait until the server has stored the event; RunFailed if it has not in time,
    saying whether the API could not be reached at all (and why) or answered without
    the event. An event that only looks sent is worse than an error; refused
    credentials fail at once."""
    query = json.dumps({"filter": {"id": {"id": [event_id]}}, "limit": 1}).encode()
    deadline = time.monotonic() + timeout_s
    unreachable = None  # why the last attempt failed, or None once the API answered
    while time.monotonic() < deadline:
        try:
            unreachable = None
            if json.loads(_call(api, "events/filter", query)).get("events"):
                return
        except OSError as exc:  # not reachable now: keep trying until the deadline
            unreachable = _unreachable(api, exc)
        time.sleep(0.5)
    cause = unreachable or "the API answered but has not stored it"
    raise RunFailed(redact(f"event {event_id} was not received by {api} within "
                           f"{timeout_s:.0f} s: {cause}"))


def emit_outcome(name: str, resource: dict, related: list[dict], payload: dict) -> Any:
    """Send a run's outcome event and return it once the server has taken it.

    Prefect's events client sends over a websocket and drops an event it could not send
    after a few reconnection attempts (a server restarting), with only a log line; an
    outcome that only looks announced would leave its listeners waiting forever. So an
    outcome goes to the server's events endpoint over HTTP, with the run's own related
    resources (flow run, flow, deployment, tags) attached as Prefect's client attaches
    them, and is sent again until the server accepts it (RESEND_TIMEOUT_S); RunFailed if
    it never does. Prefect Cloud, or no API at all: Prefect's own client."""
    from prefect.events import Event, emit_event
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api or _is_cloud(api):
        return emit_event(event=name, resource=resource, related=related, payload=payload)
    event = Event(event=name, resource=resource, related=related, payload=payload)
    event.related = [*event.related, *_run_resources(event)]
    _send(api, event)
    return event


def _run_resources(event: Any) -> list:
    """The flow run's, flow's, deployment's and tags' resources, from the run context."""
    from prefect.client.orchestration import get_client
    from prefect.events.related import related_resources_from_run_context
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def read() -> list:
        async with get_client() as client:
            return await related_resources_from_run_context(
                client, exclude={r.id for r in event.involved_resources})

    return run_coro_as_sync(read())


def _is_cloud(api: str) -> bool:
    cloud = os.environ.get("PREFECT_CLOUD_API_URL")
    if cloud is None and "prefect.settings" in sys.modules:
        from prefect.settings import PREFECT_CLOUD_API_URL

        cloud = PREFECT_CLOUD_API_URL.value()
    return api.startswith(cloud or DEFAULT_CLOUD_API)


def _send(api: str, event: Any) -> None:
    """POST the event to the server's events endpoint until it is accepted."""
    body = json.dumps([event.model_dump(mode="json")]).encode()
    deadline = time.monotonic() + RESEND_TIMEOUT_S
    while True:
        try:
            _call(api, "events", body)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or time.monotonic() > deadline:
                raise RunFailed(redact(f"event {event.id} ({event.event}) was refused by "
                                       f"{api}: HTTP {exc.code}")) from None
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RunFailed(redact(f"event {event.id} ({event.event}) could not be sent: "
                                       f"{_unreachable(api, exc)}")) from None
        time.sleep(1.0)


def resource_id(kind: str, uri: str) -> str:
    """An event resource id naming a location, its credentials (if any) redacted."""
    return f"dreg.{kind}.{redact(uri)}"


def volume_resource_id(uri: str) -> str:
    return resource_id("volume", uri)


def ingested_event(uri: str, version: str = "", fixed: str | None = None) -> dict:
    """The event that announces a new volume at `uri`, as the events endpoint takes it.
    The URI goes out as given, credentials aside (the registration refuses a URI that
    carries them; the event must not spread them)."""
    uri = redact(uri)
    payload = {"uri": uri, "version": version}
    if fixed:
        payload["fixed"] = redact(fixed)
    return {"id": str(uuid.uuid4()), "occurred": datetime.now(UTC).isoformat(),
            "event": INGESTED,
            "resource": {"prefect.resource.id": volume_resource_id(uri), "dreg.uri": uri,
                         "dreg.version": version},
            "related": [], "payload": payload}


def emit_ingested(uri: str, version: str = "", fixed: str | None = None) -> dict:
    """Announce a new volume at `uri` (call this from the ingestion system); returns the
    event sent, once the server has taken it (`confirm_delivered` says when it is stored).

    Needs PREFECT_API_URL pointing at the Prefect server (and PREFECT_API_AUTH_STRING
    where the server asks for it). No API, refused credentials or an unreachable server
    fail at once, in one line, with nothing sent. The event is one POST to the server's
    events endpoint, which publishes it to the automations as the websocket Prefect's
    client uses does; with PREFECT_API_URL in the environment, Prefect is not imported.
    Prefect Cloud: Prefect's own client.
    """
    api = configured_api()
    if not api:
        # Without it Prefect would send the event to a temporary server nobody watches.
        raise InputError("no Prefect API is configured: set PREFECT_API_URL to the Prefect "
                         "server that runs the deployments")
    if not api.startswith(("http://", "https://")):
        raise InputError(f"PREFECT_API_URL {redact(api)!r}: not an http:// or https:// URL "
                         "(e.g. http://prefect.example.org:4200/api)")
    event = ingested_event(uri, version, fixed)
    if _is_cloud(api):
        from prefect.events import emit_event

        if emit_event(event=event["event"], resource=event["resource"],
                      payload=event["payload"], id=uuid.UUID(event["id"]),
                      occurred=datetime.fromisoformat(event["occurred"])) is None:
            raise RunFailed(f"the event was not sent to {api}")
        return event
    try:
        _call(api, "events", json.dumps([event]).encode())
    except OSError as exc:  # refused, no such host, timed out, or an HTTP error answer
        raise RunFailed(redact(f"{_unreachable(api, exc)}; the event was not sent")) from None
    return event


def _related(fixed: str | None, moving: str | None, out: str | None) -> list[dict]:
    related = []
    for role, uri in (("fixed", fixed), ("moving", moving)):
        if uri:
            related.append({"prefect.resource.id": volume_resource_id(uri),
                            "prefect.resource.role": role})
    if out:
        related.append({"prefect.resource.id": resource_id("output", out),
                        "prefect.resource.role": "output"})
    return related


def emit_completed(result: RegistrationResult) -> Any:
    return emit_outcome(
        COMPLETED,
        resource={"prefect.resource.id": resource_id("field", result.field),
                  "dreg.uri": redact(result.field)},
        related=_related(result.fixed, result.moving, result.output),
        payload={"output": result.output, "field": result.field, "result": result.result,
                 "flow_run_id": result.flow_run_id, "failed_blocks": result.failed_blocks,
                 "failed_share": result.failed_share, "qc": result.qc,
                 "qc_reason": result.qc_reason},
    )


def failed_resource(out: str | None, moving: str | None, manifest: str | None = None) -> str:
    """What a failure is about: the output, else the volume (a rejected event has no
    output yet), else the batch's manifest."""
    if out:
        return resource_id("registration", out)
    if moving:
        return volume_resource_id(moving)
    return resource_id("batch", manifest or "unknown")


def emit_failed(reason: str, fixed: str | None, moving: str | None, out: str | None,
                flow_run_id: str | None, manifest: str | None = None) -> Any:
    return emit_outcome(
        FAILED,
        resource={"prefect.resource.id": failed_resource(out, moving, manifest)},
        related=_related(fixed, moving, out),
        payload={"reason": redact(reason), "flow_run_id": flow_run_id},
    )
