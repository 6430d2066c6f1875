"""One process that serves the deployments of prefect.yaml, without a work pool or worker.

    python deployments/serve.py          # serve them; needs PREFECT_API_URL
    python deployments/serve.py --show   # print what would be served, as JSON, and exit

prefect.yaml (next to this script) is the one definition of the deployments: this script
builds each of them from it, with the same name, entrypoint, description, parameters,
triggers, schedules and concurrency limit. Settings written ``{{ $NAME }}`` are read from
the environment, as `prefect deploy` reads them (DREG_MANIFEST, ...); an unset variable
leaves its setting empty. The work pool and its job variables do not apply here: the
flows run in this process's environment, and read from it at run time the Dask cluster
(DREG_DASK_ADDRESS, DREG_DASK_WORKERS), DREG_S3_ENDPOINT_URL, and the limits of runs
started by events (DREG_REFERENCE, DREG_OUT_PREFIX, DREG_ALLOWED_PREFIXES,
DREG_MAX_VOXELS, DREG_PIPELINE): no run parameter can widen them.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from prefect import serve  # noqa: E402
from prefect.client.schemas.objects import ConcurrencyLimitConfig  # noqa: E402
from prefect.deployments.runner import EntrypointType, RunnerDeployment  # noqa: E402
from prefect.events import DeploymentTriggerTypes  # noqa: E402
from prefect.schedules import Cron, Schedule  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

DEFINITION = Path(__file__).with_name("prefect.yaml")
# `{{ $NAME }}`: an environment setting. Other templates (`{{ event.payload.uri }}` in a
# trigger) are the server's to fill and are left as they are.
ENVIRONMENT_SETTING = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")
TRIGGER = TypeAdapter(DeploymentTriggerTypes)


def from_environment(value: Any) -> Any:
    """`value` with every ``{{ $NAME }}`` replaced by the environment's NAME ('' if unset)."""
    if isinstance(value, str):
        return ENVIRONMENT_SETTING.sub(lambda m: os.environ.get(m.group(1), ""), value)
    if isinstance(value, dict):
        return {key: from_environment(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_environment(item) for item in value]
    return value


def definitions(path: Path = DEFINITION) -> list[dict]:
    """The deployments that prefect.yaml declares, with environment settings filled in."""
    return from_environment(yaml.safe_load(path.read_text())["deployments"])


def schedule(spec: dict) -> Schedule:
    """A schedule of prefect.yaml; only cron schedules are declared there."""
    if set(spec) - {"cron", "timezone", "active", "parameters"}:
        raise ValueError(f"serve.py reads cron schedules only, not {spec}")
    return Cron(spec["cron"], timezone=spec.get("timezone"), active=spec.get("active", True),
                parameters=spec.get("parameters") or {})


def deployment(spec: dict) -> RunnerDeployment:
    """The deployment that one entry of prefect.yaml declares."""
    module, function = spec["entrypoint"].split(":")
    flow = getattr(importlib.import_module(module), function)
    limit = spec.get("concurrency_limit")
    # Named as `prefect deploy` names a deployment's triggers.
    triggers = [TRIGGER.validate_python({"name": f"{spec['name']}__automation_{i}", **trigger})
                for i, trigger in enumerate(spec.get("triggers") or [], start=1)]
    return flow.to_deployment(
        name=spec["name"],
        description=spec.get("description"),
        parameters=spec.get("parameters") or {},
        triggers=triggers,
        schedules=[schedule(s) for s in spec.get("schedules") or []],
        concurrency_limit=ConcurrencyLimitConfig(**limit) if limit else None,
        # A module entrypoint, as in prefect.yaml: independent of this checkout's folders.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def described(built: RunnerDeployment) -> dict:
    """What a built deployment declares, as plain JSON (for --show and its test)."""
    limit = built.concurrency_limit
    options = built.concurrency_options
    return {
        "name": built.name,
        "entrypoint": built.entrypoint,
        "description": built.description,
        "parameters": built.parameters,
        "triggers": [trigger.model_dump(mode="json", exclude={"name"})
                     for trigger in built.triggers],
        "schedules": [{"cron": s.schedule.cron, "timezone": s.schedule.timezone,
                       "active": s.active, "parameters": s.parameters}
                      for s in built.schedules or []],
        "concurrency_limit": None if limit is None else {
            "limit": limit,
            "collision_strategy": options.collision_strategy.value if options else None},
    }


def main(argv: list[str]) -> None:
    built = [deployment(spec) for spec in definitions()]
    if argv == ["--show"]:
        print(json.dumps([described(d) for d in built], indent=2))
        return
    if argv:
        sys.exit(f"usage: {Path(__file__).name} [--show]")
    serve(*built)


if __name__ == "__main__":
    main(sys.argv[1:])
