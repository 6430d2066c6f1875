"""Registration of a newly ingested volume, started by the ingestion event, and the warp
started by a registration's completion event.

Prefect entrypoints: ``flows/ingest.py:register_on_ingest`` and
``flows/ingest.py:warp_on_completion``. The ingestion event supplies `moving`,
`version` and optionally `event_fixed`; these are untrusted and validated (scheme,
allowed prefixes, size) before anything is read or written. The pipeline of a run
started this way may use only the built-in registration methods (an import path would
load code named by whoever set the run's parameters).

The trust boundary is not a run parameter: the reference volume, the output prefix, the
allowed prefixes, the largest accepted volume, the pipeline and the Dask cluster come
from the environment of the process that runs the flow (the worker's, or the serve
process's: `IngestSettings.from_environment`), so whoever can start a run through the API
cannot widen them. A run parameter may only narrow one: `max_voxels` below the setting.
The completion event supplies `out`, checked in the same way: it must lie under the
output prefix (DREG_OUT_PREFIX), where event-started registrations write.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from dreg import trust
from dreg.apply.plan import WarpResult
from dreg.io import ome_zarr, ownership, storage
from dreg.registration import PipelineConfig, RegistrationResult, default_pipeline
from dreg.registration.method import check_built_in
from dreg.registration.pipeline import load_pipeline
from dreg.registration.records import finished_with_same_inputs
from flows import artifacts, events
from flows.cluster import dask_cluster
from flows.options import RunOptions, check_run_options
from flows.registration import register_images
from flows.run_names import ingest_run_name, warp_run_name
from flows.warp import warp_image

DEFAULT_MAX_VOXELS = 2**40  # about a tebivoxel
REFERENCE_VARIABLE = "DREG_REFERENCE"
OUT_PREFIX_VARIABLE = "DREG_OUT_PREFIX"
ALLOWED_PREFIXES_VARIABLE = "DREG_ALLOWED_PREFIXES"
MAX_VOXELS_VARIABLE = "DREG_MAX_VOXELS"
PIPELINE_VARIABLE = "DREG_PIPELINE"
# A duplicate event that arrives while the first event's run still registers the volume
# waits for that run (whose lease stays live only while it runs) at most this long.
OWNER_WAIT_S = 12 * 3600.0


def split_prefixes(prefixes: list[str] | str) -> list[str]:
    """Allowed prefixes as a list; a comma-separated string (from an environment
    variable) is accepted too."""
    if isinstance(prefixes, str):
        prefixes = prefixes.split(",")
    return [p.strip() for p in prefixes if p and p.strip()]


@dataclass(frozen=True)
class IngestSettings:
    """What a run started by an event may do, set by whoever runs the worker."""

    reference: str
    out_prefix: str
    allowed_prefixes: list[str]
    max_voxels: int
    pipeline: PipelineConfig | None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> IngestSettings:
        """DREG_REFERENCE, DREG_OUT_PREFIX, DREG_ALLOWED_PREFIXES (comma-separated),
        DREG_MAX_VOXELS (default 2**40) and DREG_PIPELINE (a pipeline YAML file on the
        worker; default: the built-in pipeline), read where the flow runs."""
        environ = os.environ if environ is None else environ
        max_voxels = trust.bounded_setting(MAX_VOXELS_VARIABLE, int, 1, math.inf,
                                           "a whole number of voxels, at least 1",
                                           default=DEFAULT_MAX_VOXELS, environ=environ)
        pipeline_file = environ.get(PIPELINE_VARIABLE, "").strip()
        return cls(reference=environ.get(REFERENCE_VARIABLE, "").strip(),
                   out_prefix=environ.get(OUT_PREFIX_VARIABLE, "").strip(),
                   allowed_prefixes=split_prefixes(environ.get(ALLOWED_PREFIXES_VARIABLE, "")),
                   max_voxels=max_voxels,
                   pipeline=load_pipeline(pipeline_file) if pipeline_file else None)

    def narrowed(self, max_voxels: int | None) -> IngestSettings:
        """These settings with a run's own, smaller, voxel limit (never a larger one)."""
        if max_voxels is None:
            return self
        if not isinstance(max_voxels, int) or isinstance(max_voxels, bool) or max_voxels < 1:
            raise trust.InputError(f"max_voxels: must be a whole number of voxels, at least 1, "
                                   f"got {max_voxels!r}")
        return IngestSettings(self.reference, self.out_prefix, self.allowed_prefixes,
                              min(self.max_voxels, max_voxels), self.pipeline)


def validated_request(moving: str, version: str, event_fixed: str, reference: str,
                      out_prefix: str, allowed_prefixes: list[str], max_voxels: int) -> dict:
    """Check an event's parameters; returns the fixed, moving and output URIs to use."""
    moving = trust.validate_uri(moving, allowed_prefixes, "moving")
    trust.check_links(moving, allowed_prefixes, "moving")
    version = trust.validate_version(version)
    fixed = (trust.validate_uri(event_fixed, allowed_prefixes, "fixed") if event_fixed
             else reference)
    if event_fixed:
        trust.check_links(fixed, allowed_prefixes, "fixed")
    if not fixed:
        raise trust.InputError("fixed: no reference volume configured and none in the event")
    if not out_prefix:
        raise trust.InputError("out_prefix: the deployment has no output prefix")
    for name, uri in (("moving", moving), ("fixed", fixed)):
        image = ome_zarr.open_image(uri, require_scalar=True)
        trust.check_size(image.levels[0].grid.shape_zyx, max_voxels, name)
    out = storage.join(storage.normalize_uri(out_prefix), trust.output_name(moving, version))
    return {"fixed": fixed, "moving": moving, "out": out, "version": version}


@flow(name="dreg-register-on-ingest", flow_run_name=ingest_run_name)
def register_on_ingest(
    moving: str,
    version: str = "",
    event_fixed: str = "",
    max_voxels: int | None = None,
    options: RunOptions | None = None,
    warp: bool = True,
) -> RegistrationResult:
    """Register an ingested volume onto the reference; output under the configured
    prefix; then (unless `warp` is off) warp the volume onto the reference's grid for
    viewing. The limits are the worker's (`IngestSettings`); `max_voxels` may only lower
    its limit, and `options` may not name a Dask cluster."""
    logger = get_run_logger()
    try:
        options = check_run_options(options)
        settings = IngestSettings.from_environment().narrowed(max_voxels)
        pipeline = settings.pipeline
        check_built_in([s.method for s in (pipeline or default_pipeline()).stages], "pipeline")
        request = validated_request(moving, version, event_fixed, settings.reference,
                                    settings.out_prefix, settings.allowed_prefixes,
                                    settings.max_voxels)
    except Exception as exc:
        logger.error(f"rejected: {exc}")
        fixed = event_fixed or os.environ.get(REFERENCE_VARIABLE, "").strip() or None
        events.emit_failed(f"rejected: {exc}", fixed if isinstance(fixed, str) else None,
                           moving if isinstance(moving, str) else None, None,
                           str(flow_run.get_id()))
        raise
    logger.info(f"registering {request['moving']} onto {request['fixed']} "
                f"into {request['out']}")
    # A duplicate event while the first one's run is still at work waits for its result
    # (or, if that run dies, takes over and resumes from its stored blocks). When both
    # start at once, the one refused by the other's lease waits then.
    existing = finished_after_owner(request, pipeline, logger)
    if existing is not None:
        return existing
    try:
        return registered_and_warped(request, pipeline, options, warp)
    except ownership.OwnedElsewhere as exc:
        logger.info(f"another run took {request['out']} first; waiting for it: {exc}")
    existing = finished_after_owner(request, pipeline, logger)
    if existing is not None:
        return existing
    return registered_and_warped(request, pipeline, options, warp)


def finished_after_owner(request: dict, pipeline: PipelineConfig | None,
                         logger) -> RegistrationResult | None:
    """Once no other run owns the request's OUT: its finished registration of the same
    inputs (published on this run too), or None."""
    owners: list[str] = []

    def tell(owner: str) -> None:
        owners.append(owner)
        logger.info(f"waiting for the run that owns it: {owner}")

    waited = ownership.wait_until_free(request["out"], OWNER_WAIT_S, on_wait=tell)
    if owners:
        logger.info(f"{request['out']} is free after {waited:.0f} s")
    existing = finished_with_same_inputs(request["out"], request["fixed"], request["moving"],
                                         pipeline)
    if existing is not None:
        logger.info(f"{request['out']} already holds this registration: nothing to do")
        artifacts.publish_result(existing)
    return existing


def registered_and_warped(request: dict, pipeline: PipelineConfig | None,
                          options: RunOptions, warp: bool) -> RegistrationResult:
    """Register the request (a `register_images` subflow) and publish its result; then,
    unless `warp` is off, warp the moving volume onto the reference's grid."""
    # One cluster for the registration and the warp: a local one starts once.
    with dask_cluster(options.dask_address, options.workers):
        result = register_images(fixed=request["fixed"], moving=request["moving"],
                                 out=request["out"], pipeline=pipeline, options=options)
        artifacts.publish_result(result)  # on the run an operator opens, too
        if warp:
            warp_image(result.output, options=options)
    return result


def validated_output(out: str, out_prefix: str) -> str:
    """Check the output that a completion event names (untrusted, like every event URI):
    an s3:// URI or absolute local path under the worker's output prefix."""
    if not out_prefix:
        raise trust.InputError(f"{OUT_PREFIX_VARIABLE}: the worker has no output prefix")
    return trust.validate_uri(out, [out_prefix], "output")


@flow(name="dreg-warp-on-completion", flow_run_name=warp_run_name)
def warp_on_completion(out: str, options: RunOptions | None = None) -> WarpResult:
    """Warp the moving image of the registration that a completion event announces
    (OUT/warped.ome.zarr), once the event's `out` is checked against the worker's
    output prefix (DREG_OUT_PREFIX, never a run parameter): a rejected `out` fails the
    run with the reason, before anything is read or written."""
    options = check_run_options(options)
    out_prefix = os.environ.get(OUT_PREFIX_VARIABLE, "").strip()
    return warp_image(validated_output(out, out_prefix), options=options)
