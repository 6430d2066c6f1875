"""Registration of a newly ingested volume, started by the ingestion event, and the warp
started by a registration's completion event.

Prefect entrypoints: ``flows/ingest.py:register_on_ingest`` and
``flows/ingest.py:warp_on_completion``. The ingestion event supplies `moving`,
`version` and optionally `event_fixed`; these are untrusted and validated (scheme,
allowed prefixes, size) before anything is read or written. The pipeline of a run
started this way may use only the built-in registration methods (an import path would
load code named by whoever set the run's parameters). The reference volume, the
output prefix, the allowed prefixes and the pipeline are the deployment's parameters.
The completion event supplies `out`, checked in the same way: it must lie under the
deployment's output prefix, where event-started registrations write.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from dreg import trust
from dreg.apply.plan import WarpResult
from dreg.io import ome_zarr, storage
from dreg.registration import PipelineConfig, RegistrationResult, default_pipeline
from dreg.registration.method import check_built_in
from dreg.registration.records import finished_with_same_inputs
from flows import artifacts, events
from flows.options import RunOptions
from flows.registration import register_images
from flows.run_names import ingest_run_name, warp_run_name
from flows.warp import warp_image

DEFAULT_MAX_VOXELS = 2**40  # about a tebivoxel


def split_prefixes(prefixes: list[str] | str) -> list[str]:
    """Allowed prefixes as a list; a comma-separated string (from an environment
    variable at deploy time) is accepted too."""
    if isinstance(prefixes, str):
        prefixes = prefixes.split(",")
    return [p.strip() for p in prefixes if p and p.strip()]


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
    reference: str = "",
    out_prefix: str = "",
    allowed_prefixes: list[str] | str = "",
    pipeline: PipelineConfig | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    options: RunOptions | None = None,
    warp: bool = True,
) -> RegistrationResult:
    """Register an ingested volume onto the reference; output under `out_prefix`; then
    (unless `warp` is off) warp the volume onto the reference's grid for viewing."""
    logger = get_run_logger()
    try:
        check_built_in([s.method for s in (pipeline or default_pipeline()).stages], "pipeline")
        request = validated_request(moving, version, event_fixed, reference, out_prefix,
                                    split_prefixes(allowed_prefixes), max_voxels)
    except Exception as exc:
        logger.error(f"rejected: {exc}")
        events.emit_failed(f"rejected: {exc}", event_fixed or reference or None,
                           moving if isinstance(moving, str) else None, None,
                           str(flow_run.get_id()))
        raise
    logger.info(f"registering {request['moving']} onto {request['fixed']} "
                f"into {request['out']}")
    existing = finished_with_same_inputs(request["out"], request["fixed"], request["moving"],
                                         pipeline or default_pipeline())
    if existing is not None:
        logger.info(f"{request['out']} already holds this registration: nothing to do")
        artifacts.publish_result(existing)
        return existing
    result = register_images(fixed=request["fixed"], moving=request["moving"],
                             out=request["out"], pipeline=pipeline, options=options)
    artifacts.publish_result(result)  # on the run an operator opens, too
    if warp:
        warp_image(result.output, options=options)
    return result


def validated_output(out: str, out_prefix: str) -> str:
    """Check the output that a completion event names (untrusted, like every event URI):
    an s3:// URI or absolute local path under the deployment's output prefix."""
    if not out_prefix:
        raise trust.InputError("out_prefix: the deployment has no output prefix")
    return trust.validate_uri(out, [out_prefix], "output")


@flow(name="dreg-warp-on-completion", flow_run_name=warp_run_name)
def warp_on_completion(out: str, out_prefix: str = "",
                       options: RunOptions | None = None) -> WarpResult:
    """Warp the moving image of the registration that a completion event announces
    (OUT/warped.ome.zarr), once the event's `out` is checked: a rejected `out` fails
    the run with the reason, before anything is read or written."""
    return warp_image(validated_output(out, out_prefix), options=options)
