"""Scheduled registration: a configured pair, or every pending pair of a manifest.

Prefect entrypoint: ``flows/batch.py:register_scheduled`` (the nightly batch). A manifest
is a JSON or YAML list of ``{fixed, moving, out}`` at a local path or ``s3://`` URI; a
pair is pending while its output has no result.json. Each pending pair runs as its own
registration subflow; one failing pair does not stop the others, and the run fails at
the end if any did.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from dreg import trust
from dreg.documents import load_yaml
from dreg.errors import InputError, first_line
from dreg.io import completion, storage
from dreg.layout import RESULT_FILE
from dreg.registration import PipelineConfig
from flows import artifacts, events
from flows.options import RunOptions, checked_for_deployment
from flows.registration import register_images
from flows.run_names import nightly_run_name

# The prefixes a manifest's entries may name, from the worker's environment (as the
# deployment's other settings); unset: entries are checked for form only.
ALLOWED_PREFIXES_VARIABLE = "DREG_ALLOWED_PREFIXES"
MAX_MANIFEST_ENTRIES = 10_000


def allowed_prefixes() -> list[str]:
    return [p.strip() for p in os.environ.get(ALLOWED_PREFIXES_VARIABLE, "").split(",")
            if p.strip()]


def validated_entry(entry: dict, number: int, prefixes: list[str]) -> dict:
    """A manifest entry checked as an event's parameters are (it is read from storage
    that others may write): each of fixed, moving and out a plain s3:// URI or absolute
    local path, within the allowed prefixes where they are configured, and no link in a
    local input that leads outside them."""
    checked = {}
    for key in ("fixed", "moving", "out"):
        name = f"entry {number} {key}"
        if prefixes:
            checked[key] = trust.validate_uri(entry[key], prefixes, name)
            if key != "out":
                trust.check_links(checked[key], prefixes, name)
        else:
            checked[key] = trust.check_form(entry[key], name)
    return checked


def read_manifest(uri: str) -> list[dict]:
    """The entries of a manifest, each validated (see `validated_entry`)."""
    try:
        entries = load_yaml(storage.read_text(uri), uri)
    except FileNotFoundError:
        raise InputError(f"{uri}: no such manifest") from None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and {"fixed", "moving", "out"} <= set(e) for e in entries
    ):
        raise InputError(f"{uri}: a manifest is a list of {{fixed, moving, out}} entries")
    if len(entries) > MAX_MANIFEST_ENTRIES:
        raise InputError(f"{uri}: {len(entries)} entries, more than a manifest may hold "
                         f"({MAX_MANIFEST_ENTRIES})")
    prefixes = allowed_prefixes()
    try:
        return [validated_entry(e, n, prefixes) for n, e in enumerate(entries, start=1)]
    except InputError as exc:
        raise InputError(f"{uri}: {exc}") from None


def announce_batch_failure(flow, run, state) -> None:
    """A state hook: a failed batch (a missing manifest, pairs that failed) emits
    dreg.registration.failed about its manifest, with the reason."""
    manifest = str((run.parameters or {}).get("manifest") or "") or None
    events.emit_failed(first_line(state.message or state.name or "failed"), None, None, None,
                       str(run.id), manifest=manifest)


def pending(entries: list[dict]) -> list[dict]:
    return [e for e in entries
            if not completion.file_is_complete(storage.join(e["out"], RESULT_FILE))]


@flow(name="dreg-register-scheduled", flow_run_name=nightly_run_name,
      on_failure=[announce_batch_failure])
def register_scheduled(
    manifest: str = "",
    fixed: str = "",
    moving: str = "",
    out: str = "",
    pipeline: PipelineConfig | None = None,
    options: RunOptions | None = None,
) -> list[dict]:
    """Register every pending pair of `manifest`, or the one pair given."""
    logger = get_run_logger()
    options = checked_for_deployment(options)  # the worker's cluster, not a parameter's
    if manifest:
        entries = pending(read_manifest(manifest))
    elif fixed and moving and out:
        entries = pending([{"fixed": fixed, "moving": moving, "out": out}])
    else:
        raise InputError("give a manifest, or fixed, moving and out")
    logger.info(f"{len(entries)} pending pair(s)")
    outcomes, failures = [], []
    for entry in entries:
        try:
            result = register_images(fixed=entry["fixed"], moving=entry["moving"],
                                     out=entry["out"], pipeline=pipeline, options=options)
            artifacts.publish_result(result)  # on the nightly run an operator opens, too
            outcomes.append({"out": entry["out"], "field": result.field})
        except Exception as exc:  # noqa: BLE001 - recorded, the batch goes on
            logger.error(f"{entry['out']}: {exc}")
            failures.append({"out": entry["out"], "error": first_line(exc)})
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(entries)} pair(s) failed: {failures}")
    return outcomes
