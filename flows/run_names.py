"""Names of top-level flow runs that say what they do, for the Prefect UI (instead of
generated names like 'free-porpoise')."""

from __future__ import annotations

import datetime

from prefect.runtime import flow_run

from dreg import trust


def _name_of(uri: object) -> str:
    text = str(uri or "").rstrip("/")
    return text.rsplit("/", 1)[-1] or "output"


def _parameters() -> dict:
    return dict(flow_run.parameters or {})


def ingest_run_name() -> str:
    """register-<volume>-<version>."""
    parameters = _parameters()
    name = trust.readable_name(str(parameters.get("moving") or ""),
                               str(parameters.get("version") or ""))
    return f"register-{name}"


def register_run_name() -> str:
    return f"register-{_name_of(_parameters().get('out'))}"


def nightly_run_name() -> str:
    return f"nightly-{datetime.datetime.now(datetime.UTC):%Y-%m-%d}"


def warp_run_name() -> str:
    return f"warp-{_name_of(_parameters().get('out'))}"


def invert_run_name() -> str:
    return f"invert-{_name_of(_parameters().get('out'))}"


def points_run_name() -> str:
    parameters = _parameters()
    return f"points-from-{parameters.get('source')}-{_name_of(parameters.get('points'))}"


def qc_run_name() -> str:
    return f"qc-{_name_of(_parameters().get('out'))}"
