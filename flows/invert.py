"""Invert a finished registration's field: v maps moving points to fixed points, on the
moving image's grid.

Prefect entrypoint: ``flows/invert.py:invert_field``. The inverse's chunks go in
batches of about equal voxels, one task run on Dask each; every chunk reads only the
forward field it needs and is written under its own chunk mark. The round-trip error
of every chunk and overall goes into OUT/inverse.json and the summary.
"""

from __future__ import annotations

import json
import time

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from dreg.apply import invert
from dreg.apply.plan import InvertPlan, InvertResult, inverse_batches, plan_invert
from dreg.io import storage
from flows import artifacts
from flows.cluster import dask_cluster, worker_count
from flows.options import RunOptions
from flows.ownership import owning
from flows.run_names import invert_run_name
from tasks.apply import invert_batch, mark_complete, prepare_inverse
from tasks.publish import write_json, write_scene


@flow(name="dreg-invert-chunks")
def write_inverse(plan: InvertPlan, retries: int, workers: int) -> tuple[list[dict], int]:
    """Every chunk of the inverse, in batches; returns each chunk's round-trip
    statistics (in chunk order) and how many batches wrote them."""
    token = prepare_inverse(plan)
    task = invert_batch.with_options(retries=retries)
    batches = inverse_batches(plan, workers)
    futures = [task.submit(plan, number, batch, token) for number, batch in enumerate(batches)]
    chunks: dict[int, dict] = {}
    for batch, future in zip(batches, futures, strict=True):
        chunks.update(zip(batch, future.result(), strict=True))  # a failed batch fails the run
    return [chunks[i] for i in sorted(chunks)], len(batches)


@flow(name="dreg-invert", flow_run_name=invert_run_name)
def invert_field(out: str, options: RunOptions | None = None) -> InvertResult:
    """Write OUT/inverse.ome.zarr (moving → fixed) and OUT/inverse.json."""
    started = time.perf_counter()
    options = options or RunOptions()
    plan = plan_invert(out)
    get_run_logger().info(f"inverting {plan.field} onto a grid of {plan.grid.shape_zyx}")
    with owning(plan.out) as lease:
        with dask_cluster(options.dask_address, options.workers, warm=False) as address:
            chunks, batches = write_inverse.with_options(
                task_runner=DaskTaskRunner(address=address))(
                plan, options.block_retries, worker_count(address))
        overall = invert.merge_stats(chunks)
        result = InvertResult(output=plan.dest, field=plan.field, report=plan.report,
                              voxels=overall["voxels"], nan=overall["nan"],
                              max=overall["max"], p99=overall["p99"], rms=overall["rms"],
                              chunks=len(chunks), batches=batches,
                              seconds=round(time.perf_counter() - started, 3),
                              flow_run_id=str(flow_run.get_id()))
        write_json(plan.report, {**result.record(plan.out),
                                 "per_chunk": [_without_histogram(c) for c in chunks]})
        lease.verify("marking the inverse complete")
        mark_complete(plan.dest, plan.identity, result.model_dump(mode="json"))
        write_scene(plan.out, plan.fixed, plan.moving, inverse=True)
    artifacts.publish_output("inverse", plan.out, plan.dest, result.model_dump(mode="json"),
                             "Inverse displacement field (moving to fixed)")
    return result


def _without_histogram(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "histogram"}


def read_report(out: str) -> dict:
    return json.loads(storage.read_text(plan_invert(out).report))
