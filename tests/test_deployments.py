"""One definition of the deployments: deployments/prefect.yaml, which `prefect deploy`
reads (through the repository root's prefect.yaml) and deployments/serve.py builds from.

serve.py is run as a script (`--show` prints what it would serve), never imported:
nothing imports deployments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFINITION = ROOT / "deployments" / "prefect.yaml"
SETTINGS = ("DREG_REFERENCE", "DREG_OUT_PREFIX", "DREG_ALLOWED_PREFIXES", "DREG_MANIFEST")


def _filled(value, environment: dict[str, str]):
    """`value` with each `{{ $NAME }}` of `environment` replaced by its value."""
    if isinstance(value, dict):
        return {k: _filled(v, environment) for k, v in value.items()}
    for name, setting in environment.items():
        value = value.replace("{{ $" + name + " }}", setting)
    return value


def test_root_prefect_yaml_is_the_deployments_definition():
    assert (ROOT / "prefect.yaml").read_text() == DEFINITION.read_text()


def test_serve_script_serves_what_prefect_yaml_declares():
    environment = {name: f"value-of-{name}" for name in SETTINGS}
    env = {**os.environ, **environment, "PYTHONPATH": str(ROOT)}
    shown = subprocess.run([sys.executable, str(ROOT / "deployments" / "serve.py"), "--show"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    served = json.loads(shown.stdout)
    declared = yaml.safe_load(DEFINITION.read_text())["deployments"]

    assert [d["name"] for d in served] == [d["name"] for d in declared]
    assert [d["name"] for d in declared] == ["register-on-ingest", "register-scheduled", "warp"]
    for spec, built in zip(declared, served, strict=True):
        name = spec["name"]
        # prefect.yaml writes module:function, a served deployment module.function.
        assert built["entrypoint"] == spec["entrypoint"].replace(":", "."), name
        assert built["description"] == spec["description"], name
        assert built["parameters"] == _filled(spec.get("parameters", {}), environment), name
        assert built["concurrency_limit"] == spec.get("concurrency_limit"), name
        assert len(built["schedules"]) == len(spec.get("schedules", [])), name
        for declared_schedule, schedule in zip(spec.get("schedules", []), built["schedules"],
                                               strict=True):
            assert schedule == {"parameters": {}, **declared_schedule}, name
        assert len(built["triggers"]) == len(spec.get("triggers", [])), name
        for declared_trigger, trigger in zip(spec.get("triggers", []), built["triggers"],
                                             strict=True):
            for key, value in declared_trigger.items():
                assert trigger[key] == value, (name, key)

    by_name = {d["name"]: d for d in served}
    # issue 18 item 4: the trust boundary is no run parameter: the reference, the output
    # prefix, the allowed prefixes, the voxel limit and the pipeline reach the flow-run
    # process's environment (job variables), read at run time; nothing sets them as
    # parameters, and the flow has no parameter to widen them.
    assert by_name["register-on-ingest"]["parameters"] == {}
    env = yaml.safe_load(DEFINITION.read_text())["definitions"]["work_pool"][
        "job_variables"]["env"]
    for name in ("DREG_REFERENCE", "DREG_OUT_PREFIX", "DREG_ALLOWED_PREFIXES",
                 "DREG_MAX_VOXELS", "DREG_PIPELINE", "DREG_DASK_ADDRESS"):
        assert env[name] == "{{ $" + name + " }}", name
    assert by_name["register-on-ingest"]["triggers"][0]["parameters"]["moving"] == (
        "{{ event.payload.uri }}")
    assert by_name["register-scheduled"]["schedules"][0]["cron"] == "0 2 * * *"
    assert by_name["warp"]["triggers"][0]["enabled"] is False


def test_the_ingest_flow_takes_no_limit_from_its_parameters():
    """issue 18 item 4: the flow's parameters cannot widen what the worker allows."""
    import inspect

    from flows.ingest import register_on_ingest

    parameters = set(inspect.signature(register_on_ingest.fn).parameters)
    assert parameters == {"moving", "version", "event_fixed", "max_voxels", "options", "warp"}
