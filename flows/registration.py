"""The registration flows: one subflow per stage, and the flow that runs the stages.

A stage reads as its story: tile → register blocks → reduce → record. The registration
flow plans (validates everything first), starts (or joins) a warm Dask cluster, runs the
stages coarse to fine, each from the field of the one before, and writes result.json
last. Plans, contexts and records are built by the core (`dreg.registration`).

Prefect entrypoints: ``flows/registration.py:register_images`` (the registration) and
``flows/registration.py:register_stage`` (one stage, as a subflow).
"""

from __future__ import annotations

import hashlib
import time

from prefect import flow, get_run_logger, unmapped
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from dreg.errors import first_line
from dreg.io import ome_zarr, storage
from dreg.io.ownership import OwnedElsewhere
from dreg.registration import (
    BlockResult,
    RegistrationPlan,
    RegistrationResult,
    RunOptions,
    StagePlan,
    StageSummary,
    default_pipeline,
    plan_registration,
    stage_context,
)
from dreg.registration.outcome import FAILED
from dreg.registration.pipeline import InitialAffine, PipelineConfig
from dreg.registration.records import (
    StageTimings,
    check_last_stage,
    registration_result,
    summarize_stage,
)
from dreg.transform.field import FIELD_CHUNK, fixed_description
from dreg.transform.plan import derived_outputs
from dreg.transform.reduce import blocks_for_chunk, field_identity
from flows import artifacts, events
from flows.cluster import dask_cluster
from flows.ownership import owning
from flows.qc import check_registration
from flows.run_names import register_run_name
from tasks.publish import write_json, write_result, write_scene
from tasks.reduce import create_field, reduce_chunk
from tasks.register import build_parameter_map, register_block, tile

RESULTS_FOLDER = ".prefect-results"


def result_storage(out_uri: str) -> str:
    """A saved Prefect storage block under the output location, so that block results
    (and the cache) persist next to the output, for any process or machine. Returns the
    block's slug, which task options accept and which crosses process boundaries."""
    basepath = storage.join(out_uri, RESULTS_FOLDER)
    name = "dreg-results-" + hashlib.sha256(out_uri.encode()).hexdigest()[:16]
    if storage.is_s3(out_uri):
        block = RemoteFileSystem(basepath=basepath, settings=storage.storage_options(out_uri))
    else:
        block = LocalFileSystem(basepath=basepath)
    block.save(name, overwrite=True)
    return f"{block.get_block_type_slug()}/{name}"


def _collect(futures, blocks, progress: artifacts.Progress) -> list[BlockResult]:
    """Each block's result; a block whose task failed after its retries is recorded as
    failed with the reason, and never sinks the stage."""
    for _ in as_completed(futures):
        progress.advance()
    results = []
    for future, block in zip(futures, blocks, strict=True):
        # wait() takes the final state from the task runner itself; without it, `state`
        # reads the API, which records task-run states asynchronously and may lag.
        future.wait()
        state = future.state
        if state.is_completed():
            results.append(future.result())
        else:
            results.append(BlockResult(block, FAILED,
                                       first_line(state.message or state.name or "task failed")))
    return results


def register_blocks(ctx, blocks, stage: StagePlan, storage_block: str,
                    options: RunOptions) -> list[BlockResult]:
    """Map the block task over the stage's blocks on Dask; every block gets a result."""
    registrar = register_block.with_options(result_storage=storage_block,
                                            retries=options.block_retries)
    futures = registrar.map(unmapped(ctx), blocks)
    progress = artifacts.Progress(len(blocks), f"stage {stage.number}-{stage.name}",
                                  options.show_progress,
                                  key=artifacts.artifact_key(f"progress-{stage.number}",
                                                             stage.folder))
    return _collect(futures, blocks, progress)


def reduce_field(plan: RegistrationPlan, stage: StagePlan, previous, results,
                 destinations: list[str]) -> int:
    """Create the stage's field at every destination and fill it chunk by chunk, each
    chunk from the blocks that reach it; returns the field's voxel count."""
    fixed_info = fixed_description(ome_zarr.open_image(plan.fixed_uri))
    created = [create_field.submit(uri, stage.field_grid, fixed_info, plan.moving_uri)
               for uri in destinations]
    for future in created:
        future.result()  # a field that could not be created fails the stage, here
    chunks = ome_zarr.chunk_regions(stage.field_grid.shape_zyx, (FIELD_CHUNK,) * 3)
    futures = [
        reduce_chunk.submit(index, blocks_for_chunk(results, chunk), chunk, stage.field_grid,
                            stage.fixed_grid.shape_zyx, float(stage.config.field_grid_factor),
                            previous, destinations)
        for index, chunk in enumerate(chunks)
    ]
    return sum(f.result()["voxels"] for f in futures)  # a failed chunk fails the stage


@flow(name="dreg-stage", flow_run_name="stage-{stage.number}-{stage.config.name}")
def register_stage(
    plan: RegistrationPlan,
    stage: StagePlan,
    parameter_map: dict[str, list[str]],
    previous: StageSummary | None,
    destinations: list[str],
    result_storage_block: str,
    options: RunOptions,
) -> StageSummary:
    """One resolution stage: tile → register blocks → reduce into a field → record."""
    started = time.perf_counter()
    logger = get_run_logger()
    ctx = stage_context(plan, stage, parameter_map, previous.field if previous else None,
                        previous.identity if previous else "", options.debug)
    blocks = tile(stage.fixed_grid.shape_zyx, stage.config.block_size, stage.config.overlap,
                  stage.field_grid.shape_zyx, float(stage.config.field_grid_factor))
    logger.info(f"stage {stage.number}-{stage.name}: {len(blocks)} blocks at level {stage.level}")
    results = register_blocks(ctx, blocks, stage, result_storage_block, options)
    registered = time.perf_counter()
    voxels = reduce_field(plan, stage, ctx.previous, results, destinations)
    finished = time.perf_counter()

    timings = StageTimings(seconds=finished - started, register_seconds=registered - started,
                           reduce_seconds=finished - registered)
    summary = summarize_stage(stage, results, field_identity(repr(ctx), results), voxels,
                              timings, str(flow_run.get_id()))
    write_json(stage.table_uri, [r.row() for r in results])
    write_json(stage.summary_uri, summary.model_dump(mode="json"))
    logger.info(f"stage {stage.number}-{stage.name}: {summary.counts} in {summary.seconds} s")
    return summary


@flow(name="dreg-preflight")
def preflight(plan: RegistrationPlan) -> list[dict[str, list[str]]]:
    """Every stage's elastix parameter map, built and tried on a tiny image on the
    cluster's workers, so that a map elastix rejects fails the run before any block."""
    futures = [build_parameter_map.submit(s.config.transform, s.config.parameters, s.name)
               for s in plan.stages]
    return [future.result() for future in futures]


def run_stages(plan: RegistrationPlan, storage_block: str,
               options: RunOptions) -> list[StageSummary]:
    """Preflight, then every stage coarse to fine, on one warm Dask cluster."""
    summaries: list[StageSummary] = []
    with dask_cluster(options.dask_address, options.workers) as address:
        runner = DaskTaskRunner(address=address)
        parameter_maps = preflight.with_options(task_runner=runner)(plan)
        for stage, parameter_map in zip(plan.stages, parameter_maps, strict=True):
            destinations = [stage.field_uri]
            if stage is plan.stages[-1]:
                destinations.append(plan.field_uri)
            summaries.append(register_stage.with_options(task_runner=runner)(
                plan, stage, parameter_map, summaries[-1] if summaries else None,
                destinations, storage_block, options,
            ))
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
    plan = plan_registration(fixed, moving, out, pipeline or default_pipeline(), initial,
                             overwrite=options.overwrite)
    with owning(plan.out_uri) as lease:
        # Replacing a finished result: withdraw its completion mark before touching it,
        # and what was derived from its field (warped image, inverse): it would be stale.
        for uri in [plan.result_uri, *derived_outputs(plan.out_uri)]:
            storage.remove_tree(uri)
        summaries = run_stages(plan, result_storage(plan.out_uri), options)
        check_last_stage(summaries)
        result = registration_result(plan, summaries, str(flow_run.get_id()),
                                     time.perf_counter() - started)
        if options.qc:
            result = check_registration(result, options)
        write_scene(plan.out_uri, plan.fixed_uri, plan.moving_uri)
        lease.check()  # never mark complete an output another run may have written
        write_result(plan.result_uri, result)
    artifacts.publish_result(result)
    events.emit_completed(result)
    return result
