"""Prefect tasks of a stage's registration step: check parameters, tile, register blocks."""

from __future__ import annotations

import os

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.context import TaskRunContext

from dreg.registration import BlockResult, StageContext, elastix, tiling
from dreg.registration.block import register_block as register_block_core

FAULT_VARIABLE = "DREG_FAULT_INJECT"
BLOCK_CACHE_POLICY = INPUTS + TASK_SOURCE


@task(name="build-parameter-map", retries=1)
def build_parameter_map(
    transform: str, overrides: dict, stage_name: str, threads: int = 1
) -> dict[str, list[str]]:
    """A stage's elastix parameter map, tried briefly on a tiny image so that a map
    elastix rejects fails the run before any block runs. Runs on a (warm) worker."""
    pmap = elastix.parameter_map(transform, overrides, threads)
    elastix.check_parameter_map(pmap, f"stage {stage_name}")
    return pmap


@task(name="tile")
def tile(shape_zyx, block_size, overlap: float, field_shape_zyx, factor: float) -> list:
    """The stage's blocks."""
    return tiling.tile(shape_zyx, block_size, overlap, field_shape_zyx, factor)


def _inject_fault(block: tiling.Block) -> None:
    """Fail on purpose, for testing retries and failure handling.

    ``DREG_FAULT_INJECT="<block name>:<attempts>"`` (several separated by commas) makes
    the named block raise on its first <attempts> attempts. Unset in normal use.
    """
    spec = os.environ.get(FAULT_VARIABLE, "")
    context = TaskRunContext.get()
    attempt = context.task_run.run_count if context else 1
    for item in filter(None, spec.split(",")):
        name, _, attempts = item.partition(":")
        if name == block.name and attempt <= int(attempts or 1):
            raise RuntimeError(f"injected fault in block {block.name} (attempt {attempt})")


@task(
    name="register-block",
    retries=2,
    retry_delay_seconds=1,
    cache_policy=BLOCK_CACHE_POLICY,
    persist_result=True,
    task_run_name="register-block-{block.name}",
)
def register_block(ctx: StageContext, block: tiling.Block) -> BlockResult:
    """Register one block. Its cache key is everything it depends on: `ctx` carries both
    images' URIs and versions, the level, the previous field's identity, the stage's
    parameters and the code version; `block` its region."""
    _inject_fault(block)
    result = register_block_core(ctx, block)
    message = f"block {block.name}: {result.status} in {result.seconds:.1f} s"
    if result.reason:
        message += f" ({result.reason})"
    get_run_logger().info(message)
    return result
