"""Prefect tasks of a stage's reduce step: create the field, compute it in batches of
chunks."""

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
    name="reduce-chunks",
    retries=2,
    retry_delay_seconds=1,
    task_run_name="reduce-chunks-{number}",
)
def reduce_chunks(
    number: int,
    parts: list[tuple[Region, list[BlockResult]]],
    field_grid: Grid,
    image_shape_zyx: tuple[int, int, int],
    factor: float,
    previous,
    destinations: list[str],
) -> dict:
    """Blend, compose and write a batch of chunks of the stage's field (each with the
    blocks that reach it) to every destination: one task run per batch, not per chunk."""
    return reduce.reduce_chunks(
        parts, field_grid, image_shape_zyx, factor, previous, destinations
    )
