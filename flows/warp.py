"""Warp an image onto the fixed image's grid through a finished registration's field.

Prefect entrypoint: ``flows/warp.py:warp_image``. Every output chunk is one task on
Dask (it reads the field around it and only the moving region it maps into); then each
pyramid level, chunk by chunk, from the level above. The output is marked complete last.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from dreg.apply.plan import WarpPlan, WarpResult, plan_warp, warp_chunks
from dreg.io import ome_zarr
from flows import artifacts
from flows.cluster import dask_cluster
from flows.options import RunOptions, checked_for_deployment
from flows.ownership import owning
from flows.run_names import warp_run_name
from tasks.apply import downsample_chunk, mark_complete, prepare_warped, warp_chunk


@flow(name="dreg-warp-chunks")
def write_warped(plan: WarpPlan, retries: int) -> int:
    """Level 0 chunk by chunk, then the pyramid; returns level 0's voxel count."""
    token = prepare_warped(plan)
    options = {"retries": retries}
    regions = warp_chunks(plan)
    futures = [warp_chunk.with_options(**options).submit(plan, region, i, token)
               for i, region in enumerate(regions)]
    voxels = sum(f.result()["voxels"] for f in futures)  # a failed chunk fails the run
    image = ome_zarr.open_image(plan.dest)
    for level in range(1, len(image.levels)):
        lv = image.levels[level]
        futures = [downsample_chunk.with_options(**options).submit(
                       plan.dest, level, region, i, plan.pyramid_method, token)
                   for i, region in enumerate(ome_zarr.chunk_regions(lv.grid.shape_zyx,
                                                                      lv.chunks_zyx))]
        for future in futures:
            future.result()
    return voxels


@flow(name="dreg-warp", flow_run_name=warp_run_name)
def warp_image(out: str, image: str | None = None, to: str | None = None,
               interpolation: str = "linear", options: RunOptions | None = None) -> WarpResult:
    """Resample `image` (default: the registration's moving image) onto the fixed grid
    through OUT/field.ome.zarr; write an OME-Zarr 0.5 pyramid to `to` (default
    OUT/warped.ome.zarr)."""
    started = time.perf_counter()
    options = checked_for_deployment(options)  # a deployment's run: the worker's cluster
    plan = plan_warp(out, image, to, interpolation, overwrite=options.overwrite)
    get_run_logger().info(f"warping {plan.image} into {plan.dest} ({plan.interpolation})")
    with owning(plan.out) as lease:
        with dask_cluster(options.dask_address, options.workers, warm=False) as address:
            voxels = write_warped.with_options(task_runner=DaskTaskRunner(address=address))(
                plan, options.block_retries)
        result = WarpResult(output=plan.dest, image=plan.image, field=plan.field,
                            interpolation=plan.interpolation,
                            levels=len(ome_zarr.open_image(plan.dest).levels), voxels=voxels,
                            chunks=len(warp_chunks(plan)),
                            seconds=round(time.perf_counter() - started, 3),
                            flow_run_id=str(flow_run.get_id()))
        lease.verify("marking the warped image complete")
        mark_complete(plan.dest, plan.identity, result.model_dump(mode="json"))
    artifacts.publish_output("warped", plan.out, plan.dest, result.model_dump(mode="json"),
                             "Warped image (moving image on the fixed grid)")
    return result
