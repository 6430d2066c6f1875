"""Prefect tasks that write a registration's records: block tables, result.json."""

from __future__ import annotations

import json

from prefect import task

from dreg.apply import scene
from dreg.io import completion, storage
from dreg.registration import RegistrationResult
from tasks.names import written_name


@task(name="write-json", retries=2, retry_delay_seconds=1, task_run_name=written_name("write"))
def write_json(uri: str, document: dict | list) -> str:
    """Write a small JSON document in one piece."""
    storage.write_text(uri, json.dumps(document, indent=2))
    return uri


@task(name="write-result", retries=2, retry_delay_seconds=1)
def write_result(uri: str, result: RegistrationResult) -> str:
    """Write result.json: the last write of a registration, its completion mark."""
    completion.write_whole(uri, result.document())
    return uri


@task(name="write-scene", retries=2, retry_delay_seconds=1)
def write_scene(out_uri: str, fixed_uri: str, moving_uri: str, inverse: bool = False) -> None:
    """OUT's root group: the scene metadata from fixed to moving (a bijection once the
    inverse exists)."""
    scene.write_scene(out_uri, fixed_uri, moving_uri, inverse)
