"""The registration flows: one subflow per stage, and the flow that runs the stages.

A stage reads as its story: tile → register blocks (in batches, each block stored on its
own) → reduce (in batches of chunks) → record. The registration flow plans (validates
everything first), starts (or joins) a Dask cluster, runs the stages coarse to fine, each
from the field of the one before, checks that the inputs did not change meanwhile, and
writes result.json last. Plans, contexts and records are built by the core (`dreg.registration`).

Prefect entrypoints: ``flows/registration.py:register_images`` (the registration) and
``flows/registration.py:register_stage`` (one stage, as a subflow).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import dask
import numpy as np
from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from dreg.apply.plan import check_derived_replaceable, derived_outputs
from dreg.errors import DregError, StorageError, describe, first_line
from dreg.field import FIELD_CHUNK, fixed_description
from dreg.io import completion, ome_zarr, storage
from dreg.io.batches import region_batches
from dreg.io.ownership import OwnedElsewhere
from dreg.registration import (
    BlockResult,
    RegistrationPlan,
    RegistrationResult,
    StagePlan,
    StageSummary,
    plan_registration,
    stage_context,
)
from dreg.registration.block import plan_batches
from dreg.registration.outcome import FAILED
from dreg.registration.pipeline import InitialAffine, PipelineConfig
from dreg.registration.plan import check_inputs_unchanged, remove_stale_fields
from dreg.registration.records import (
    StageTimings,
    check_failed_share,
    check_last_stage,
    registration_result,
    summarize_stage,
)
from dreg.registration.reduce import blocks_for_chunk, field_identity
from dreg.registration.store import block_key, load_entry
from flows import artifacts, events
from flows.cluster import BLOCK_RESOURCE, block_workers, dask_cluster
from flows.options import RunOptions
from flows.ownership import fence, owning
from flows.qc import check_registration
from flows.run_names import register_run_name
from tasks.publish import write_json, write_result, write_scene
from tasks.reduce import create_field, reduce_chunks
from tasks.register import register_batch, tile


def _lost_batch(ctx, batch, state) -> list[BlockResult]:
    """The blocks of a batch that failed after its retries. Storage errors and bad input
    fail the run (they are not registration failures); otherwise (a worker that died,
    an unexpected error) the blocks it had stored are kept and the rest are recorded as
    failed, with the batch's reason."""
    error = state.result(raise_on_failure=False) if state.is_failed() else None
    if isinstance(error, DregError):
        raise error
    if isinstance(error, OSError):
        raise StorageError(f"{ctx.store_dir}: {describe(error)}")
    if isinstance(error, BaseException):
        reason = describe(error)
    elif state.is_final():
        reason = f"{state.name}: {first_line(state.message or 'no message')}"
    else:  # never a bare "Running" or "Pending" as a reason
        reason = f"its task did not finish (last seen {state.name})"
    key_inputs = ctx.key_inputs()
    results = []
    for block in batch:
        stored = load_entry(ctx.store_dir, block_key(key_inputs, block), block)
        results.append(stored or BlockResult(block, FAILED, f"its task failed: {reason}"))
    return results


def register_blocks(ctx, blocks, stage: StagePlan, workers: int,
                    options: RunOptions) -> list[BlockResult]:
    """Register the stage's blocks in batches on Dask, one block at a time per worker;
    every block gets a result, in the blocks' order."""
    batches = plan_batches(blocks, workers, options.batch_size)
    task = register_batch.with_options(retries=options.block_retries)
    futures = []
    with dask.annotate(resources={BLOCK_RESOURCE: 1}):
        for number, batch in enumerate(batches, start=1):
            fence(stage.folder, f"submitting batch {number} of stage {stage.folder}")
            futures.append(task.submit(ctx, batch))
    progress = artifacts.Progress(len(blocks), f"stage {stage.number}-{stage.name}",
                                  options.show_progress,
                                  key=artifacts.artifact_key(f"progress-{stage.number}",
                                                             stage.folder))
    sizes = {id(f): len(b) for f, b in zip(futures, batches, strict=True)}
    for future in as_completed(futures):
        progress.advance(sizes[id(future)])
        fence(stage.folder, f"going on with stage {stage.folder}")
    results: list[BlockResult] = []
    for future, batch in zip(futures, batches, strict=True):
        # wait() takes the final state from the task runner itself; without it, `state`
        # reads the API, which records task-run states asynchronously and may lag.
        future.wait()
        state = future.state
        if state.is_completed():
            results.extend(future.result().results)
        else:
            results.extend(_lost_batch(ctx, batch, state))
    return results


def reduce_field(plan: RegistrationPlan, stage: StagePlan, previous, results,
                 destinations: list[str], identity: str, workers: int) -> int:
    """Create the stage's field at every destination that does not already hold it
    complete, fill it in batches of chunks (each chunk from the blocks that reach it),
    then mark it complete; returns the field's voxel count."""
    voxels = int(np.prod(stage.field_grid.shape_zyx))
    destinations = [uri for uri in destinations if not completion.is_complete(uri, identity)]
    if not destinations:
        return voxels  # every block was stored and the field was already made from them
    fixed_info = fixed_description(ome_zarr.open_image(plan.fixed_uri))
    created = []
    for uri in destinations:  # creating a field replaces whatever is there
        fence(uri, f"creating the field {uri}", verify=True)
        created.append(create_field.submit(uri, stage.field_grid, fixed_info,
                                           plan.moving_uri))
    for future in created:
        future.result()  # a field that could not be created fails the stage, here
    chunks = list(ome_zarr.chunk_regions(stage.field_grid.shape_zyx, (FIELD_CHUNK,) * 3))
    futures = []
    for number, batch in enumerate(region_batches(chunks, workers)):
        fence(destinations[0], f"writing batch {number} of the chunks of "
                               f"{', '.join(destinations)}")
        parts = [(chunks[i], blocks_for_chunk(results, chunks[i])) for i in batch]
        futures.append(reduce_chunks.submit(
            number, parts, stage.field_grid, stage.fixed_grid.shape_zyx,
            float(stage.config.field_grid_factor), previous, destinations))
    for future in futures:
        future.result()  # a failed chunk fails the stage
    for uri in destinations:
        fence(uri, f"marking {uri} complete", verify=True)
        completion.mark_complete(uri, identity)
    return voxels


@flow(name="dreg-stage", flow_run_name="stage-{stage.number}-{stage.config.name}")
def register_stage(
    plan: RegistrationPlan,
    stage: StagePlan,
    previous: StageSummary | None,
    final_field: str | None,
    workers: int,
    options: RunOptions,
) -> StageSummary:
    """One resolution stage: tile → register blocks → reduce into a field → record."""
    started = time.perf_counter()
    logger = get_run_logger()
    ctx = stage_context(plan, stage, previous.field if previous else None,
                        previous.identity if previous else "", options.debug,
                        options.storage_patience)
    blocks = tile(stage.fixed_grid.shape_zyx, stage.config.block_size, stage.config.overlap,
                  stage.field_grid.shape_zyx, float(stage.config.field_grid_factor))
    logger.info(f"stage {stage.number}-{stage.name}: {len(blocks)} blocks at level {stage.level}")
    results = register_blocks(ctx, blocks, stage, workers, options)
    registered = time.perf_counter()
    identity = field_identity(json.dumps(asdict(ctx.key_inputs()), default=str), results)
    destinations = [stage.field_uri(identity), *([final_field] if final_field else [])]
    voxels = reduce_field(plan, stage, ctx.previous, results, destinations, identity,
                          workers)
    finished = time.perf_counter()

    timings = StageTimings(seconds=finished - started, register_seconds=registered - started,
                           reduce_seconds=finished - registered)
    summary = summarize_stage(stage, results, identity, voxels, timings,
                              str(flow_run.get_id()))
    fence(stage.folder, f"recording stage {stage.folder}", verify=True)
    write_json(stage.table_uri, [r.row() for r in results])
    write_json(stage.summary_uri, summary.document(plan.out_uri))
    fence(stage.folder, f"removing the earlier fields of {stage.folder}", verify=True)
    remove_stale_fields(stage, summary.field)
    logger.info(f"stage {stage.number}-{stage.name}: {summary.counts} "
                f"({summary.reused} stored blocks reused) in {summary.seconds} s")
    return summary


def run_stages(plan: RegistrationPlan, options: RunOptions, address: str
               ) -> list[StageSummary]:
    """Every stage coarse to fine, on the Dask cluster at `address`; a stage with too
    many failed blocks stops the run."""
    summaries: list[StageSummary] = []
    runner = DaskTaskRunner(address=address)
    workers = block_workers(address)
    for stage in plan.stages:
        fence(plan.out_uri, f"stage {stage.folder}", verify=True)
        final = plan.field_uri if stage is plan.stages[-1] else None
        summary = register_stage.with_options(task_runner=runner)(
            plan, stage, summaries[-1] if summaries else None, final, workers, options)
        summaries.append(summary)
        if final:
            check_last_stage(summaries)
        check_failed_share(summary, options.max_failed_share)
    return summaries


def announce_failure(flow, run, state) -> None:
    """A state hook: emit dreg.registration.failed with the reason. A run refused because
    another owns OUT announces nothing: OUT is fine, and its owner will announce."""
    reason = first_line(state.message or state.name or "failed")
    if OwnedElsewhere.__name__ in reason:
        return
    interrupt = next((m for m in events.INTERRUPT_MARKERS if m in reason), None)
    if interrupt:
        reason = f"interrupted ({interrupt})"
    parameters = run.parameters or {}
    events.emit_failed(reason, parameters.get("fixed"), parameters.get("moving"),
                       parameters.get("out"), str(run.id))


@flow(name="dreg-register", flow_run_name=register_run_name, on_failure=[announce_failure],
      on_crashed=[announce_failure])
def register_images(
    fixed: str,
    moving: str,
    out: str,
    pipeline: PipelineConfig | None = None,
    initial_affine: InitialAffine | None = None,
    options: RunOptions | None = None,
) -> RegistrationResult:
    """Register `moving` onto `fixed` and write the displacement field under `out`.

    The field maps fixed points to moving points. result.json is written last: its
    presence means the result is complete.
    """
    started = time.perf_counter()
    options = options or RunOptions()
    initial = initial_affine.to_transform() if initial_affine else None
    plan = plan_registration(fixed, moving, out, pipeline, initial,
                             overwrite=options.overwrite)
    check_derived_replaceable(plan.out_uri)
    with owning(plan.out_uri) as lease:
        # Replacing a finished result: withdraw its completion mark before touching it,
        # and what was derived from its field (warped image, inverse): it would be stale.
        for uri in [plan.result_uri, *derived_outputs(plan.out_uri)]:
            fence(uri, f"removing {uri}", verify=True)
            storage.remove_tree(uri)
        # One cluster for the stages and QC: a local one starts once per run.
        with dask_cluster(options.dask_address, options.workers, warm=False) as address:
            summaries = run_stages(plan, options, address)
            check_inputs_unchanged(plan)
            result = registration_result(plan, summaries, str(flow_run.get_id()),
                                         time.perf_counter() - started)
            if options.qc:
                result = check_registration(
                    result, options.model_copy(update={"dask_address": address}))
        fence(plan.out_uri, f"writing the scene of {plan.out_uri}", verify=True)
        write_scene(plan.out_uri, plan.fixed_uri, plan.moving_uri)
        # never mark complete an output another run may have written
        lease.verify(f"writing {plan.result_uri}")
        write_result(plan.result_uri, result)
    artifacts.publish_result(result)
    events.emit_completed(result)
    return result
