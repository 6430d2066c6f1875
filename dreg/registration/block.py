"""Register one block: the core of a stage's mapped step.

Read the padded fixed block; skip it when it has too little foreground; find the moving
region that the previous transform maps it into (sampled on a lattice over the block,
plus a margin) and read only that; resample it onto the block's grid through the
previous transform; register the block to it with the stage's method (elastix by
default; dreg.registration.method); reject a result whose similarity is worse than
before; sample the residual on the block's share of the stage's field grid and store it
next to the stage. Every outcome is a `BlockResult`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from dreg.errors import StorageError, first_line
from dreg.field import (
    AffineTransform,
    as_transform,
    displacement_of,
)
from dreg.grid import Grid, Region, region_from_bounds, whole_region
from dreg.io import completion, ome_zarr, storage
from dreg.registration.method import DEFAULT_METHOD, BlockPair, resolve
from dreg.registration.outcome import (
    FAILED,
    OK,
    OUTSIDE_MOVING,
    REJECTED_METRIC,
    SKIPPED_EMPTY,
    BlockResult,
)
from dreg.registration.similarity import normalized_mutual_information
from dreg.registration.store import BlockKeyInputs, block_key, load_entry, save_entry
from dreg.registration.tiling import Block

LATTICE_POINTS = 9  # per axis, over the padded block, to find the moving region
MARGIN_VOXELS = 2  # beyond the mapped lattice's bounding box, for interpolation

@dataclass(frozen=True)
class StageContext:
    """What every block of a stage shares. Plain data: it crosses task boundaries.

    `previous` is the transform handed to the stage: an affine, or the URI of the
    previous stage's field, whose identity (the mark it carries once complete) is
    `previous_identity`. The versions identify the images' content. `method` names the
    block-registration method; it is resolved in the worker that needs it, and elastix's
    parameter map is built there from `transform` and `parameters`, so that a stage whose
    blocks are all stored never loads elastix.
    """

    fixed_uri: str
    moving_uri: str
    level: int
    fixed_grid: Grid
    moving_grid: Grid
    field_grid: Grid
    previous: AffineTransform | str
    transform: str
    parameters: dict
    foreground_intensity: float
    foreground_fraction: float
    metric_guard: bool
    store_dir: str
    fixed_version: str = ""
    moving_version: str = ""
    previous_identity: str = ""
    code_version: str = ""
    threads: int = 1
    storage_patience: float = 300.0
    log_dir: str | None = None
    method: str = DEFAULT_METHOD

    def key_inputs(self) -> BlockKeyInputs:
        """What a block's stored outcome depends on besides the block (none of it a
        location under OUT)."""
        previous = (self.previous_identity if isinstance(self.previous, str)
                    else json.dumps(asdict(self.previous)))
        return BlockKeyInputs(
            fixed_uri=self.fixed_uri, moving_uri=self.moving_uri,
            fixed_version=self.fixed_version, moving_version=self.moving_version,
            level=self.level,
            grids={"fixed": self.fixed_grid.to_dict(), "moving": self.moving_grid.to_dict(),
                   "field": self.field_grid.to_dict()},
            previous=previous,
            method={"name": self.method, "version": resolve(self.method).version(),
                    "transform": self.transform, "parameters": self.parameters,
                    "threads": self.threads},
            foreground=(self.foreground_intensity, self.foreground_fraction),
            metric_guard=self.metric_guard,
            code_version=self.code_version,
        )


@dataclass(frozen=True)
class BatchOutcome:
    """A batch's block results, in the batch's order; `reused` of them came from the
    store."""

    results: list[BlockResult]
    reused: int


def lattice_indices(region: Region, points: int = LATTICE_POINTS) -> np.ndarray:
    """A lattice of continuous indices over a region, edges included, shape (N, 3)."""
    axes = [np.linspace(s.start, s.stop - 1, min(points, s.stop - s.start)) for s in region]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def moving_region(
    block_region: Region, fixed_grid: Grid, moving_grid: Grid, previous
) -> Region | None:
    """The region of the moving image that the block maps into, or None if it misses it."""
    points = fixed_grid.index_to_world(lattice_indices(block_region))
    mapped = moving_grid.world_to_index(points + displacement_of(previous, points))
    lo = np.floor(mapped.min(axis=0)).astype(int) - MARGIN_VOXELS
    hi = np.ceil(mapped.max(axis=0)).astype(int) + MARGIN_VOXELS + 1
    shape = np.array(moving_grid.shape_zyx)
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    if np.any(hi <= lo):
        return None
    return region_from_bounds(lo, hi)


def resample_moving(
    moving: np.ndarray,
    region: Region,
    moving_grid: Grid,
    block_grid: Grid,
    previous,
) -> np.ndarray:
    """The moving region resampled onto the block's grid through the previous transform.

    Linear interpolation; outside the moving region the nearest border value is held.
    """
    points = block_grid.region_points(whole_region(block_grid.shape_zyx))
    flat = points.reshape(-1, 3)
    index = moving_grid.world_to_index(flat + displacement_of(previous, flat))
    index -= np.array([s.start for s in region], dtype=float)
    warped = ndimage.map_coordinates(moving, index.T, order=1, mode="nearest")
    return warped.reshape(block_grid.shape_zyx).astype(np.float32)


def open_previous(ctx: StageContext):
    """The transform handed to the stage. A previous field must carry the identity this
    stage was planned from: a field that is incomplete, or another run's, is never read
    as if it were the right one."""
    previous = as_transform(ctx.previous)
    if isinstance(ctx.previous, str):
        found = completion.completed_identity(previous.attributes)
        if found != ctx.previous_identity:
            raise StorageError(
                f"{ctx.previous}: the previous stage's field is not the complete field this "
                f"stage was planned from (its identity is {found or 'absent'}, expected "
                f"{ctx.previous_identity})", transient=False)
    return previous


Outcome = tuple[BlockResult, "np.ndarray | None"]


def _registered_block(
    ctx: StageContext, block: Block, fixed: np.ndarray, started: float
) -> Outcome:
    """Steps after the foreground check: moving region, resample, the method, guard."""
    previous = open_previous(ctx)
    region = moving_region(block.padded, ctx.fixed_grid, ctx.moving_grid, previous)
    if region is None:
        return BlockResult(block, OUTSIDE_MOVING, "the block maps outside the moving image",
                           seconds=time.perf_counter() - started), None
    moving_image = ome_zarr.open_image(ctx.moving_uri)
    moving = ome_zarr.read_region(moving_image, ctx.level, region).astype(np.float32)
    block_grid = ctx.fixed_grid.subgrid(block.padded)
    warped = resample_moving(moving, region, ctx.moving_grid, block_grid, previous)
    before = normalized_mutual_information(fixed, warped)

    registrar = resolve(ctx.method)
    pair = BlockPair(name=block.name, fixed=fixed, warped=warped, block_grid=block_grid,
                     field_grid=ctx.field_grid.subgrid(block.field_box),
                     transform=ctx.transform, parameters=ctx.parameters, previous=previous,
                     fixed_uri=ctx.fixed_uri, moving_uri=ctx.moving_uri, threads=ctx.threads,
                     log_dir=ctx.log_dir)
    try:
        result = registrar.register(pair)
    except RuntimeError as exc:
        return BlockResult(block, FAILED, f"{registrar.name}: {first_line(exc)}",
                           metric_before=before, seconds=time.perf_counter() - started), None
    after = normalized_mutual_information(fixed, result.result_image)
    if ctx.metric_guard and after < before:
        return BlockResult(
            block, REJECTED_METRIC,
            f"similarity fell from {before:.4f} to {after:.4f} (normalized mutual information)",
            metric_before=before, metric_after=after, seconds=time.perf_counter() - started,
        ), None
    return (BlockResult(block, OK, "", before, after, time.perf_counter() - started),
            result.residual)


def register_block(ctx: StageContext, block: Block) -> Outcome:
    """Register one block; returns its result and, when it succeeded, its residual on
    the block's share of the field grid. Storage errors propagate; only the method's own
    failures come back as a FAILED result, with the method's reason."""
    started = time.perf_counter()
    fixed_image = ome_zarr.open_image(ctx.fixed_uri)
    fixed = ome_zarr.read_region(fixed_image, ctx.level, block.padded)
    fixed = fixed.astype(np.float32)
    foreground = float(np.mean(fixed > ctx.foreground_intensity))
    if foreground < ctx.foreground_fraction:
        return BlockResult(
            block, SKIPPED_EMPTY,
            f"foreground {foreground:.1%} below the threshold {ctx.foreground_fraction:.1%}",
            seconds=time.perf_counter() - started,
        ), None
    return _registered_block(ctx, block, fixed, started)




BATCHES_PER_WORKER = 8  # enough for load balance and for progress that moves
MAX_BATCHES = 2000  # task runs per stage: Prefect's bookkeeping stays small
BATCH_BLOCKS = 64  # a batch stays a few tens of seconds to minutes of work


def plan_batches(blocks: Sequence[Block], workers: int,
                 batch_size: int | None = None) -> list[list[Block]]:
    """Cut a stage's blocks into batches, one task run each, in the blocks' order.

    By default each worker gets about BATCHES_PER_WORKER batches of at most
    BATCH_BLOCKS blocks; only a stage that would then exceed MAX_BATCHES task runs gets
    larger batches.
    """
    if batch_size is None:
        per_worker = len(blocks) // (max(workers, 1) * BATCHES_PER_WORKER)
        batch_size = max(1, math.ceil(len(blocks) / MAX_BATCHES),
                         min(BATCH_BLOCKS, per_worker))
    return [list(blocks[i:i + batch_size]) for i in range(0, len(blocks), batch_size)]


def register_batch(ctx: StageContext, blocks: Sequence[Block]) -> BatchOutcome:
    """Register a batch of blocks, each stored on its own as soon as it is done, so that
    a batch that is retried or resumed redoes only the blocks it had not finished.

    A block already in the store is reused. A transient storage error is tried again
    for up to `ctx.storage_patience` seconds; then (or at once, for broken data) it
    propagates and fails the batch: storage errors are never recorded as failed blocks.
    """
    key_inputs = ctx.key_inputs()
    results, reused = [], 0
    for block in blocks:
        key = block_key(key_inputs, block)
        stored = load_entry(ctx.store_dir, key, block)
        if stored is not None:
            results.append(stored)
            reused += 1
            continue
        result, residual = storage.patiently(lambda b=block: register_block(ctx, b),
                                             ctx.storage_patience)
        results.append(storage.patiently(
            lambda r=result, d=residual, k=key: save_entry(ctx.store_dir, k, r, d),
            ctx.storage_patience))
    return BatchOutcome(results, reused)
