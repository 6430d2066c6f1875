"""Prefect tasks of the flows that use a finished registration: warp, invert, points.

Thin wrappers over `dreg.apply` (and `dreg.io.tables`, which writes the points' parts):
each chunk or batch is one task run with retries. Resuming rests on the output's own
chunk marks (`dreg.io.completion.once`), keyed by the output's token: a re-run or a
resumed run skips the chunks already written and marked, and a new output trusts no old
mark. Prefect keeps no result of these tasks (``persist_result=False``): nothing is
pickled into the output, whose location may be shared.
"""

from __future__ import annotations

from prefect import task

from dreg.apply import invert, points, warp
from dreg.apply.plan import InvertPlan, PointsPlan, WarpPlan, chunk_region
from dreg.field import FIELD_CHUNK
from dreg.grid import Region
from dreg.io import completion, ome_zarr, pyramid, tables

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


@task(name="warp-chunk", **CHUNK_TASK, task_run_name="warp-chunk-{index}")
def warp_chunk(plan: WarpPlan, region: Region, index: int, token: str) -> dict:
    return completion.once(plan.dest, token, f"0-{index}", lambda: warp.warp_chunk(
        plan.field, plan.image, 0, plan.dest, region, plan.interpolation))


@task(name="downsample-chunk", **CHUNK_TASK,
      task_run_name="downsample-level-{level}-chunk-{index}")
def downsample_chunk(uri: str, level: int, region: Region, index: int, method: str,
                     token: str) -> int:
    """One chunk of a pyramid level, from the level above it."""
    def write() -> dict:
        image = ome_zarr.open_image(uri)
        data = pyramid.downsample_region(image, level - 1, region, method=method)
        ome_zarr.write_region(image, level, region, data)
        return {"voxels": int(data.size)}

    return int(completion.once(uri, token, f"{level}-{index}", write)["voxels"])


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


@task(name="write-points", retries=2, retry_delay_seconds=1)
def write_points(plan: PointsPlan, batches: int) -> str:
    """Concatenate the batches' parts in order into the output file."""
    tables.concatenate_parts([tables.part_uri(plan.dest, i) for i in range(batches)], plan.dest)
    return plan.dest


@task(name="mark-complete", retries=2, retry_delay_seconds=1)
def mark_complete(uri: str, identity: str, summary: dict) -> None:
    """The last write of a chunk-wise output: whole, made from `identity`."""
    completion.mark_complete(uri, identity, {"summary": summary})
