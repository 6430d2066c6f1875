"""Prefect tasks of a stage's reduce step: create the field, compute it chunk by chunk."""

from __future__ import annotations

from prefect import task

from dreg import field
from dreg.grid import Grid, Region
from dreg.registration import BlockResult, reduce
from tasks.names import written_name


@task(name="create-field", retries=2, retry_delay_seconds=1, task_run_name=written_name("create"))
def create_field(uri: str, grid: Grid, fixed: dict, moving_uri: str) -> str:
    """An empty field (replacing an earlier one at the same place)."""
    field.create_field(uri, grid, fixed=fixed, moving_uri=moving_uri, overwrite=True)
    return uri


@task(
    name="reduce-chunk",
    retries=2,
    retry_delay_seconds=1,
    task_run_name="reduce-chunk-{index}",
)
def reduce_chunk(
    index: int,
    results: list[BlockResult],
    chunk: Region,
    field_grid: Grid,
    image_shape_zyx: tuple[int, int, int],
    factor: float,
    previous,
    destinations: list[str],
) -> dict:
    """Blend, compose and write one chunk of the stage's field to every destination."""
    return reduce.reduce_chunk(
        results, chunk, field_grid, image_shape_zyx, factor, previous, destinations
    )
