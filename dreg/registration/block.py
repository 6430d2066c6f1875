"""Register one block: the core of a stage's mapped step.

Read the padded fixed block; skip it when it has too little foreground; find the moving
region that the previous transform maps it into (sampled on a lattice over the block,
plus a margin) and read only that; resample it onto the block's grid through the
previous transform; register the block to it with elastix; reject a result whose
similarity is worse than before; sample the residual on the block's share of the
stage's field grid and store it next to the stage. Every outcome is a `BlockResult`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from dreg.errors import first_line
from dreg.grid import Grid, Region, region_from_bounds, whole_region
from dreg.io import ome_zarr, storage
from dreg.registration import elastix
from dreg.registration.outcome import (
    FAILED,
    OK,
    OUTSIDE_MOVING,
    REJECTED_METRIC,
    SKIPPED_EMPTY,
    BlockResult,
    save_residual,
)
from dreg.registration.similarity import normalized_mutual_information
from dreg.registration.tiling import Block
from dreg.transform.field import AffineTransform, as_transform, displacement_of

LATTICE_POINTS = 9  # per axis, over the padded block, to find the moving region
MARGIN_VOXELS = 2  # beyond the mapped lattice's bounding box, for interpolation

@dataclass(frozen=True)
class StageContext:
    """What every block of a stage shares. Plain data: it crosses task boundaries.

    `previous` is the transform handed to the stage: an affine, or the URI of the
    previous stage's field. The versions identify content for caching.
    """

    fixed_uri: str
    moving_uri: str
    level: int
    fixed_grid: Grid
    moving_grid: Grid
    field_grid: Grid
    previous: AffineTransform | str
    parameter_map: dict[str, list[str]]
    foreground_intensity: float
    foreground_fraction: float
    metric_guard: bool
    residual_dir: str
    fixed_version: str = ""
    moving_version: str = ""
    previous_version: str = ""
    log_dir: str | None = None


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


def residual_uri(ctx: StageContext, block: Block) -> str:
    """Where a block's residual is stored: named by everything it depends on, so a result
    computed under other inputs or parameters is never overwritten or mistaken for it."""
    identity = repr((replace(ctx, log_dir=None), block)).encode()
    digest = hashlib.sha256(identity).hexdigest()[:16]
    return storage.join(ctx.residual_dir, f"{block.name}-{digest}.npy")


def _run_elastix(ctx: StageContext, block: Block, fixed, warped, block_grid: Grid):
    """Run elastix; with a log folder, its log goes there (elastix writes a local file,
    which is then copied, so the folder may be on S3)."""
    if not ctx.log_dir:
        return elastix.register(fixed, warped, block_grid, ctx.parameter_map)
    with tempfile.TemporaryDirectory(prefix="dreg-elastix-") as local:
        log_file = os.path.join(local, f"elastix-{block.name}.log")
        try:
            return elastix.register(fixed, warped, block_grid, ctx.parameter_map, log_file)
        finally:
            if os.path.exists(log_file):
                with open(log_file, "rb") as handle:
                    storage.write_bytes(storage.join(ctx.log_dir, os.path.basename(log_file)),
                                        handle.read())


def _registered_block(
    ctx: StageContext, block: Block, fixed: np.ndarray, started: float
) -> BlockResult:
    """Steps after the foreground check: moving region, resample, elastix, guard."""
    previous = as_transform(ctx.previous)
    region = moving_region(block.padded, ctx.fixed_grid, ctx.moving_grid, previous)
    if region is None:
        return BlockResult(block, OUTSIDE_MOVING, "the block maps outside the moving image",
                           seconds=time.perf_counter() - started)
    moving_image = ome_zarr.open_image(ctx.moving_uri)
    moving = ome_zarr.read_region(moving_image, ctx.level, region).astype(np.float32)
    block_grid = ctx.fixed_grid.subgrid(block.padded)
    warped = resample_moving(moving, region, ctx.moving_grid, block_grid, previous)
    before = normalized_mutual_information(fixed, warped)

    try:
        result = _run_elastix(ctx, block, fixed, warped, block_grid)
    except RuntimeError as exc:
        return BlockResult(block, FAILED, f"elastix: {first_line(exc)}",
                           metric_before=before, seconds=time.perf_counter() - started)
    after = normalized_mutual_information(fixed, result.result_image)
    if ctx.metric_guard and after < before:
        return BlockResult(
            block, REJECTED_METRIC,
            f"similarity fell from {before:.4f} to {after:.4f} (normalized mutual information)",
            metric_before=before, metric_after=after, seconds=time.perf_counter() - started,
        )
    residual = elastix.displacement_on_grid(
        result.transform, ctx.field_grid.subgrid(block.field_box)
    )
    uri = residual_uri(ctx, block)
    save_residual(uri, residual)
    return BlockResult(block, OK, "", before, after, time.perf_counter() - started,
                       residual_uri=uri)


def register_block(ctx: StageContext, block: Block) -> BlockResult:
    """Register one block; returns its result. Storage errors propagate (retryable);
    elastix failures come back as a FAILED result with elastix's reason."""
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
        )
    return _registered_block(ctx, block, fixed, started)


