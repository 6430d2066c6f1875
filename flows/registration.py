"""The registration flows: one subflow per stage, and the flow that runs the stages.

A stage reads as its story: tile → register blocks → reduce → record. The registration
flow validates everything first, starts (or joins) a warm Dask cluster, runs the stages
coarse to fine, each from the field of the one before, and writes result.json last.

Prefect entrypoints: ``flows/registration.py:register_images`` (the registration) and
``flows/registration.py:register_stage`` (one stage, as a subflow).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import Counter

from prefect import flow, get_run_logger, unmapped
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.futures import as_completed, wait
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from deployments import events
from dreg import field, ome_zarr, storage
from dreg.pipeline import InitialAffine, PipelineConfig, default_pipeline
from dreg.plan import (
    RegistrationPlan,
    StagePlan,
    code_version,
    plan_registration,
    result_document,
)
from dreg.reduce import blocks_for_chunk, field_identity
from dreg.register_block import FAILED, OK, BlockResult, StageContext
from flows import artifacts
from flows.cluster import dask_cluster
from tasks.publish import write_json, write_result
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
        options = storage.storage_options(out_uri)
        block = RemoteFileSystem(basepath=basepath, settings=options)
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
            reason = (state.message or state.name or "task failed").splitlines()[0]
            results.append(BlockResult(block, FAILED, reason))
    return results


@flow(name="dreg-stage", flow_run_name="stage-{stage.number}-{stage.config.name}")
def register_stage(
    plan: RegistrationPlan,
    stage: StagePlan,
    parameter_map: dict[str, list[str]],
    previous: str | None,
    previous_version: str,
    destinations: list[str],
    result_storage_block: str,
    show_progress: bool = False,
    debug: bool = False,
    block_retries: int = 2,
) -> dict:
    """One resolution stage: tile → register blocks → reduce into a field → record."""
    started = time.perf_counter()
    logger = get_run_logger()
    fixed = ome_zarr.open_image(plan.fixed_uri)
    moving = ome_zarr.open_image(plan.moving_uri)
    ctx = StageContext(
        fixed_uri=plan.fixed_uri,
        moving_uri=plan.moving_uri,
        level=stage.level,
        fixed_grid=stage.fixed_grid,
        moving_grid=stage.moving_grid,
        field_grid=stage.field_grid,
        field_factor=float(stage.config.field_grid_factor),
        previous=previous if previous is not None else plan.initial,
        parameter_map=parameter_map,
        foreground_intensity=plan.foreground_intensity,
        foreground_fraction=stage.config.foreground_threshold,
        metric_guard=stage.config.metric_guard,
        residual_dir=stage.residual_dir,
        fixed_version=ome_zarr.fingerprint(fixed, [stage.level]),
        moving_version=ome_zarr.fingerprint(moving, [stage.level]),
        previous_version=previous_version + "/" + code_version(),
        log_dir=storage.join(stage.folder, "elastix-logs") if debug else None,
    )

    blocks = tile(stage.fixed_grid.shape_zyx, stage.config.block_size, stage.config.overlap,
                  stage.field_grid.shape_zyx, float(stage.config.field_grid_factor))
    logger.info(f"stage {stage.number}-{stage.name}: {len(blocks)} blocks at level {stage.level}")
    registrar = register_block.with_options(result_storage=result_storage_block,
                                            retries=block_retries)
    futures = registrar.map(unmapped(ctx), blocks)
    progress = artifacts.Progress(len(blocks), f"stage {stage.number}-{stage.name}",
                                  show_progress)
    results = _collect(futures, blocks, progress)
    registered = time.perf_counter()

    fixed_info = field.fixed_description(plan.fixed_uri, fixed.levels[0].grid)
    wait([create_field.submit(uri, stage.field_grid, fixed_info, plan.moving_uri)
          for uri in destinations])
    chunk_futures = []
    for region in ome_zarr.chunk_regions(stage.field_grid.shape_zyx, (field.FIELD_CHUNK,) * 3):
        chunk = tuple((s.start, s.stop) for s in region)
        chunk_futures.append(reduce_chunk.submit(
            blocks_for_chunk(results, chunk), chunk, stage.field_grid,
            stage.fixed_grid.shape_zyx, float(stage.config.field_grid_factor),
            ctx.previous, destinations,
        ))
    reduced = [f.result() for f in chunk_futures]  # a failed chunk fails the stage
    finished = time.perf_counter()

    counts = Counter(r.status for r in results)
    summary = {
        "number": stage.number,
        "name": stage.name,
        "flow_run_id": str(flow_run.get_id()),
        "level": stage.level,
        "transform": stage.config.transform,
        "blocks": len(blocks),
        "counts": dict(counts),
        "field": stage.field_uri,
        "identity": field_identity(repr(ctx), results),
        "seconds": round(finished - started, 3),
        "register_seconds": round(registered - started, 3),
        "reduce_seconds": round(finished - registered, 3),
        "block_seconds": round(sum(r.seconds for r in results), 3),
        "field_voxels": sum(r["voxels"] for r in reduced),
        "failures": [r.row() for r in results if r.status != OK][:200],
    }
    write_json(stage.table_uri, [r.row() for r in results])
    write_json(storage.join(stage.folder, "stage.json"), summary)
    logger.info(f"stage {stage.number}-{stage.name}: {dict(counts)} in {summary['seconds']} s")
    return summary


@flow(name="dreg-preflight")
def preflight(plan: RegistrationPlan) -> list[dict[str, list[str]]]:
    """Every stage's elastix parameter map, built and tried on a tiny image on the
    cluster's workers, so that a map elastix rejects fails the run before any block."""
    futures = [build_parameter_map.submit(s.config.transform, s.config.parameters, s.name)
               for s in plan.stages]
    return [future.result() for future in futures]


@contextlib.contextmanager
def _failure_announced(fixed: str, moving: str, out: str):
    """Emit dreg.registration.failed, with the reason, if the block raises."""
    try:
        yield
    except BaseException as exc:
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0] if text else ''}"
        events.emit_failed(reason, fixed, moving, out, str(flow_run.get_id()))
        raise


@flow(name="dreg-register")
def register_images(
    fixed: str,
    moving: str,
    out: str,
    pipeline: PipelineConfig | None = None,
    initial_affine: InitialAffine | None = None,
    overwrite: bool = False,
    dask_address: str | None = None,
    workers: int | None = None,
    debug: bool = False,
    show_progress: bool = False,
    block_retries: int = 2,
) -> dict:
    """Register `moving` onto `fixed` and write the displacement field under `out`.

    The field maps fixed points to moving points. result.json is written last: its
    presence means the result is complete.
    """
    with _failure_announced(fixed, moving, out):
        started = time.perf_counter()
        pipeline = pipeline or default_pipeline()
        initial = initial_affine.to_transform() if initial_affine else None
        plan = plan_registration(fixed, moving, out, pipeline, initial, overwrite=overwrite)
        if storage.exists(plan.result_uri):
            # Replacing a finished result: withdraw its completion mark before touching it.
            storage.remove_tree(plan.result_uri)
        storage_slug = result_storage(plan.out_uri)

        summaries = []
        with dask_cluster(dask_address, workers) as address:
            runner = DaskTaskRunner(address=address)
            parameter_maps = preflight.with_options(task_runner=runner)(plan)
            previous, previous_version = None, ""
            for stage, parameter_map in zip(plan.stages, parameter_maps, strict=True):
                destinations = [stage.field_uri]
                if stage is plan.stages[-1]:
                    destinations.append(plan.field_uri)
                summary = register_stage.with_options(task_runner=runner)(
                    plan, stage, parameter_map, previous, previous_version, destinations,
                    storage_slug,
                    show_progress, debug, block_retries,
                )
                summaries.append(summary)
                previous, previous_version = stage.field_uri, summary["identity"]

        result = {
            "output": plan.out_uri,
            "field": plan.field_uri,
            "result": plan.result_uri,
            "fixed": plan.fixed_uri,
            "moving": plan.moving_uri,
            "flow_run_id": str(flow_run.get_id()),
            "stages": summaries,
            "block_counts": {s["name"]: s["counts"] for s in summaries},
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_result(plan.result_uri, result_document(plan, summaries, {
            "output": plan.out_uri, "flow_run_id": result["flow_run_id"],
            "block_counts": result["block_counts"], "seconds": result["seconds"],
        }))
        artifacts.publish_field_link(plan.out_uri, plan.field_uri)
        artifacts.publish_status_table(summaries)
        artifacts.publish_summary(result)
    events.emit_completed(result)
    return result
