"""Warp an image onto the fixed image's grid through a finished registration's field.

Prefect entrypoint: ``flows/warp.py:warp_image``. The output's chunks go in batches,
one task run on Dask each (a brick of neighbouring chunks: each chunk reads the field
around it and only the moving region it maps into, and is written under its own chunk
mark); then each pyramid level, in batches too, from the level above. The output is
marked complete last.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from dreg.apply.plan import (
    WarpPlan,
    WarpResult,
    plan_warp,
    warp_batches,
    warp_chunks,
)
from dreg.io import ome_zarr
from dreg.io.batches import chunk_batches
from flows import artifacts
from flows.cluster import dask_cluster, worker_count
from flows.options import RunOptions, checked_for_deployment
from flows.ownership import owning
from flows.run_names import warp_run_name
from tasks.apply import downsample_batch, mark_complete, prepare_warped, warp_batch


@flow(name="dreg-warp-chunks")
def write_warped(plan: WarpPlan, retries: int, workers: int) -> tuple[int, int]:
    """Level 0 in batches of chunks, then the pyramid; returns level 0's voxel count and
    how many batches wrote it."""
    token = prepare_warped(plan)
    options = {"retries": retries}
    batches = warp_batches(plan, workers)
    futures = [warp_batch.with_options(**options).submit(plan, number, batch, token)
               for number, batch in enumerate(batches)]
    # A failed batch fails the run.
    voxels = sum(chunk["voxels"] for f in futures for chunk in f.result())
    image = ome_zarr.open_image(plan.dest)
    for level in range(1, len(image.levels)):
        lv = image.levels[level]
        futures = [downsample_batch.with_options(**options).submit(
                       plan.dest, level, number, batch, plan.pyramid_method, token)
                   for number, batch in enumerate(
                       chunk_batches(lv.grid.shape_zyx, lv.chunks_zyx, workers))]
        for future in futures:
            future.result()
    return voxels, len(batches)


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
            voxels, batches = write_warped.with_options(
                task_runner=DaskTaskRunner(address=address))(
                plan, options.block_retries, worker_count(address))
        result = WarpResult(output=plan.dest, image=plan.image, field=plan.field,
                            interpolation=plan.interpolation,
                            levels=len(ome_zarr.open_image(plan.dest).levels), voxels=voxels,
                            chunks=len(warp_chunks(plan)), batches=batches,
                            seconds=round(time.perf_counter() - started, 3),
                            flow_run_id=str(flow_run.get_id()))
        lease.verify("marking the warped image complete")
        mark_complete(plan.dest, plan.identity, result.model_dump(mode="json"))
    artifacts.publish_output("warped", plan.out, plan.dest, result.model_dump(mode="json"),
                             "Warped image (moving image on the fixed grid)")
    return result
