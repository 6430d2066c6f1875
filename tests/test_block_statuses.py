"""One block driven into each status that is not a plain success, through the block
registration core (dreg/registration/block.py) with no Prefect: skipped for too little
foreground, mapped outside the moving image, and rejected because the similarity fell.
The first two stop before any registration; the third runs elastix."""

from __future__ import annotations

import numpy as np
import pytest

from dreg.field import AffineTransform
from dreg.grid import Grid, whole_region
from dreg.io import ome_zarr
from dreg.registration import tiling
from dreg.registration.block import StageContext, register_block
from dreg.registration.outcome import OUTSIDE_MOVING, REJECTED_METRIC, SKIPPED_EMPTY

SHAPE = (24, 24, 24)
GRID = Grid(SHAPE, (1.0, 1.0, 1.0))


def write_image(uri: str, array: np.ndarray) -> None:
    image = ome_zarr.create_image(uri, [GRID], "float32")
    ome_zarr.write_region(image, 0, whole_region(SHAPE), array)


def texture(shift_x: float = 0.0) -> np.ndarray:
    """A smooth texture, about 100 ± 60, optionally moved `shift_x` voxels along x."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in SHAPE), indexing="ij")
    x = x + shift_x
    waves = (np.sin(2 * np.pi * x / 11 + 0.3) + np.sin(2 * np.pi * y / 13 + 1.1)
             + np.sin(2 * np.pi * z / 9 + 2.0) + np.sin(2 * np.pi * (x + y - z) / 17))
    return (100.0 + 15.0 * waves).astype(np.float32)


def stage(tmp_path, fixed: np.ndarray, moving: np.ndarray, **changes) -> StageContext:
    """A one-block stage over the pair at level 0, registered from `previous`."""
    fixed_uri, moving_uri = str(tmp_path / "fixed.ome.zarr"), str(tmp_path / "moving.ome.zarr")
    write_image(fixed_uri, fixed)
    write_image(moving_uri, moving)
    settings = dict(
        fixed_uri=fixed_uri, moving_uri=moving_uri, level=0, fixed_grid=GRID,
        moving_grid=GRID, field_grid=GRID, previous=AffineTransform(),
        transform="translation", parameters={}, foreground_intensity=50.0,
        foreground_fraction=0.1, metric_guard=True, store_dir=str(tmp_path / "store"),
    )
    settings.update(changes)
    return StageContext(**settings)


def the_block() -> tiling.Block:
    [block] = tiling.tile(SHAPE, None, 0.0, SHAPE, 1.0)
    return block


def test_a_block_with_too_little_foreground_is_skipped(tmp_path):
    fixed = np.zeros(SHAPE, np.float32)
    fixed[:2] = 200.0  # 2 of 24 planes above the intensity: 8.3 % foreground
    result, residual = register_block(stage(tmp_path, fixed, texture()), the_block())
    assert result.status == SKIPPED_EMPTY
    assert result.reason == "foreground 8.3% below the threshold 10.0%"
    assert residual is None
    assert (result.metric_before, result.metric_after) == (None, None)


def test_a_block_that_maps_outside_the_moving_image(tmp_path):
    # The previous transform moves every point of the block 100 voxels past the moving
    # image's far x edge.
    previous = AffineTransform(translation=(124.0, 0.0, 0.0))
    ctx = stage(tmp_path, texture(), texture(), previous=previous)
    result, residual = register_block(ctx, the_block())
    assert result.status == OUTSIDE_MOVING
    assert result.reason == "the block maps outside the moving image"
    assert residual is None
    assert (result.metric_before, result.metric_after) == (None, None)


@pytest.mark.elastix
def test_a_registration_that_lowers_the_similarity_is_rejected(tmp_path):
    # The moving image is the fixed one moved a voxel along x with its contrast inverted.
    # Normalized correlation, elastix's metric here, is at its worst where the inverted
    # texture lines up, so elastix moves the block away from alignment, and the
    # normalized mutual information that the guard compares (blind to contrast) falls.
    ctx = stage(tmp_path, texture(), 250.0 - texture(shift_x=1.0),
                parameters={"Metric": "AdvancedNormalizedCorrelation"})
    result, residual = register_block(ctx, the_block())
    assert result.status == REJECTED_METRIC, result
    assert residual is None
    assert result.metric_after < result.metric_before
    assert result.reason == (
        f"similarity fell from {result.metric_before:.4f} to {result.metric_after:.4f} "
        "(normalized mutual information)")
