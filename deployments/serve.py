"""One process that serves both deployments, without a work pool or worker.

    python deployments/serve.py

Reads the same settings as prefect.yaml from the environment (DREG_REFERENCE,
DREG_OUT_PREFIX, DREG_ALLOWED_PREFIXES, DREG_MANIFEST, DREG_DASK_ADDRESS, ...), and needs
PREFECT_API_URL pointing at the Prefect server.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import serve  # noqa: E402
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger  # noqa: E402

from flows import events  # noqa: E402
from flows.batch import register_scheduled  # noqa: E402
from flows.ingest import register_on_ingest  # noqa: E402

INGEST_TRIGGER = DeploymentEventTrigger(
    match={"prefect.resource.id": "dreg.volume.*"},
    expect={events.INGESTED},
    parameters={
        "moving": "{{ event.payload.uri }}",
        "version": "{{ event.payload.version | default('') }}",
        "event_fixed": "{{ event.payload.fixed | default('') }}",
    },
)


def main() -> None:
    env = os.environ.get
    serve(
        register_on_ingest.to_deployment(
            name="register-on-ingest",
            triggers=[INGEST_TRIGGER],
            parameters={"reference": env("DREG_REFERENCE", ""),
                        "out_prefix": env("DREG_OUT_PREFIX", ""),
                        "allowed_prefixes": env("DREG_ALLOWED_PREFIXES", "")},
        ),
        register_scheduled.to_deployment(
            name="register-scheduled",
            cron="0 2 * * *",
            parameters={"manifest": env("DREG_MANIFEST", "")},
        ),
    )


if __name__ == "__main__":
    main()
