"""Prefect tasks of a stage's registration step: tile, and register batches of blocks."""

from __future__ import annotations

import os

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from dreg.errors import DregError
from dreg.registration import StageContext, tiling
from dreg.registration.block import BatchOutcome
from dreg.registration.block import register_batch as register_batch_core

FAULT_VARIABLE = "DREG_FAULT_INJECT"


@task(name="tile")
def tile(shape_zyx, block_size, overlap: float, field_shape_zyx, factor: float) -> list:
    """The stage's blocks."""
    return tiling.tile(shape_zyx, block_size, overlap, field_shape_zyx, factor)


def _inject_fault(blocks: list[tiling.Block]) -> None:
    """Fail on purpose, for testing retries and failure handling.

    ``DREG_FAULT_INJECT="<block name>:<attempts>"`` (several separated by commas) makes
    the batch holding the named block raise on its first <attempts> attempts, before it
    registers anything. Unset in normal use.
    """
    spec = os.environ.get(FAULT_VARIABLE, "")
    context = TaskRunContext.get()
    attempt = context.task_run.run_count if context else 1
    names = {block.name for block in blocks}
    for item in filter(None, spec.split(",")):
        name, _, attempts = item.partition(":")
        if name in names and attempt <= int(attempts or 1):
            raise RuntimeError(f"injected fault in block {name} (attempt {attempt})")


def batch_name() -> str:
    """'register-blocks-<first>-to-<last>' (block grid indices), for the Prefect UI."""
    from prefect.runtime import task_run

    blocks = (task_run.parameters or {}).get("blocks") or []
    if not blocks:
        return "register-blocks"
    last = f"-to-{blocks[-1].name}" if len(blocks) > 1 else ""
    return f"register-blocks-{blocks[0].name}{last}"


def _worth_retrying(task, task_run, state) -> bool:
    """Retry a batch unless it failed on bad input or on a storage error that outlasted
    its patience: trying again would only repeat the wait."""
    try:
        state.result()
    except DregError:
        return False
    except Exception:  # noqa: BLE001 - any other failure may pass on another try
        return True
    return True


@task(
    name="register-blocks",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_worth_retrying,
    # The block store is the cache, block by block (dreg.registration.store): a batch
    # that runs again reuses every block it had finished.
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name=batch_name,
)
def register_batch(ctx: StageContext, blocks: list[tiling.Block]) -> BatchOutcome:
    """Register a batch of blocks, reusing those already in the stage's block store."""
    _inject_fault(blocks)
    outcome = register_batch_core(ctx, blocks)
    logger = get_run_logger()
    for result in outcome.results:
        message = f"block {result.block.name}: {result.status}"
        message += " (stored)" if result.reused else f" in {result.seconds:.1f} s"
        if result.reason:
            message += f" ({result.reason})"
        logger.info(message)
    return outcome
