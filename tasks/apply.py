"""Prefect tasks of the flows that use a finished registration: warp, invert, points.

Thin wrappers over `dreg.apply` (and `dreg.io.tables`, which writes the points' parts):
each batch (of chunks, of rows) or chunk is one task run with retries. Resuming rests on
the output's own chunk marks (`dreg.io.completion.once`, one per chunk, also inside a
batch), keyed by the output's token: a re-run or a resumed run skips the chunks already
written and marked, and a new output trusts no old mark. Prefect keeps no result of these
tasks (``persist_result=False``): nothing is pickled into the output, whose location may
be shared.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from dreg.apply import invert, points, warp
from dreg.apply.plan import InvertPlan, PointsPlan, WarpPlan
from dreg.field import FIELD_CHUNK
from dreg.io import completion, ome_zarr, pyramid, tables
from dreg.io.batches import chunk_region

# Chunk tasks keep no Prefect result or cache: their chunk marks are the resume state.
CHUNK_TASK = {"retries": 2, "retry_delay_seconds": 1, "persist_result": False}


@task(name="prepare-warped", retries=2, retry_delay_seconds=1)
def prepare_warped(plan: WarpPlan) -> str:
    """The warped image's output, reused when it was made from the same inputs."""
    def create(attributes: dict) -> None:
        warp.create_warped(plan.dest, plan.fixed_grid, plan.dtype, plan.components,
                           chunks=plan.chunk, overwrite=True,
                           attributes={**attributes, "image": plan.image, "field": plan.field,
                                       "interpolation": plan.interpolation})

    return completion.start(plan.dest, plan.identity, create)


@task(name="warp-chunks", **CHUNK_TASK, task_run_name="warp-chunks-{batch}")
def warp_batch(plan: WarpPlan, batch: int, indices: list[int], token: str) -> list[dict]:
    """A batch of level-0 chunks (indices into `warp_chunks`' C order), each under its
    own chunk mark: a retried or resumed batch skips the chunks it had written."""
    shape, chunks = plan.fixed_grid.shape_zyx, (plan.chunk,) * 3
    return warp.warp_batch(plan.field, plan.image, 0, plan.dest,
                           [(f"0-{i}", chunk_region(shape, chunks, i)) for i in indices],
                           plan.interpolation, token)


@task(name="downsample-chunks", **CHUNK_TASK,
      task_run_name="downsample-level-{level}-chunks-{batch}")
def downsample_batch(uri: str, level: int, batch: int, indices: list[int], method: str,
                      token: str) -> int:
    """A batch of chunks of a pyramid level, from the level above it, each under its own
    chunk mark; returns the voxels of the batch."""
    lv = ome_zarr.open_image(uri).levels[level]
    named = [(f"{level}-{i}", chunk_region(lv.grid.shape_zyx, lv.chunks_zyx, i))
             for i in indices]
    return sum(pyramid.downsample_batch(uri, level, named, method, token))


@task(name="prepare-inverse", retries=2, retry_delay_seconds=1)
def prepare_inverse(plan: InvertPlan) -> str:
    def create(attributes: dict) -> None:
        image = invert.create_inverse(plan.dest, ome_zarr.open_image(plan.field),
                                      plan.moving_grid, plan.moving, overwrite=True)
        ome_zarr.update_attributes(image.uri, attributes)

    return completion.start(plan.dest, plan.identity, create)


@task(name="invert-chunks", **CHUNK_TASK, task_run_name="invert-chunks-{batch}")
def invert_batch(plan: InvertPlan, batch: int, indices: list[int], token: str) -> list[dict]:
    """A batch of the inverse's chunks (indices into `inverse_chunks`' C order), each
    under its own chunk mark, named by its index as when a task run wrote one chunk: a
    retried or resumed batch skips the chunks it had written."""
    return invert.invert_batch(
        plan.field, plan.dest,
        [(str(i), chunk_region(plan.grid.shape_zyx, (FIELD_CHUNK,) * 3, i)) for i in indices],
        token)


@task(name="prepare-points", retries=2, retry_delay_seconds=1)
def prepare_points(plan: PointsPlan) -> str:
    return completion.start_parts(tables.parts_folder(plan.dest), plan.identity)


@task(name="transform-points", **CHUNK_TASK,
      task_run_name="transform-points-rows-{start}-{stop}")
def transform_points(plan: PointsPlan, start: int, stop: int, index: int,
                     token: str) -> dict:
    return completion.once(
        tables.parts_folder(plan.dest), token, f"{index:06d}",
        lambda: points.transform_points_batch(plan.field, plan.mapping, plan.points, start,
                                              stop, tables.part_uri(plan.dest, index)))


@task(name="write-points", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def write_points(plan: PointsPlan, batches: int, running: Sequence | None = None) -> str:
    """Concatenate the batches' parts in order into the output file.

    `running` (passed within `quote`, so that Prefect does not wait for them first) are
    the batch tasks' futures, in batch order. Where the parts share one schema (a Parquet
    input), each part is appended as soon as its batch and those before it are done,
    while the later batches still run; else once all are done. A failed batch fails
    this task with its error."""
    parts = [tables.part_uri(plan.dest, i) for i in range(batches)]
    futures = list(running or [])
    if futures and tables.parts_share_schema(tables.open_points_file(plan.points,
                                                                      count_rows=False)):
        def done_in_order():
            for uri, future in zip(parts, futures, strict=True):
                future.result()  # waits; raises the batch's error
                yield uri

        tables.concatenate_parts(done_in_order(), plan.dest, same_schema=True)
        return plan.dest
    for future in futures:
        future.result()
    tables.concatenate_parts(parts, plan.dest)
    return plan.dest


@task(name="mark-complete", retries=2, retry_delay_seconds=1)
def mark_complete(uri: str, identity: str, summary: dict) -> None:
    """The last write of a chunk-wise output: whole, made from `identity`."""
    completion.mark_complete(uri, identity, {"summary": summary})
