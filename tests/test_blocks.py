"""Unit tests of the block grid, blending weights, the moving region and composition."""

from __future__ import annotations

import numpy as np
import pytest

from dreg.field import AffineTransform
from dreg.grid import Grid
from dreg.registration import tiling
from dreg.registration.block import moving_region
from dreg.registration.reduce import compose


def test_tiles_cover_the_image_with_cropped_padding():
    tiles = tiling.tile((70, 64, 40), 32, 0.25, (35, 32, 20), 2.0)
    assert [t.index for t in tiles][:2] == [(0, 0, 0), (0, 1, 0)]
    # 70 = 32 + 38: the 6-voxel remainder joins the last core; 40 is one block along x.
    assert sorted({(t.core[0].start, t.core[0].stop) for t in tiles}) == [(0, 32), (32, 70)]
    assert {(t.core[2].start, t.core[2].stop) for t in tiles} == {(0, 40)}
    first = tiles[0]
    assert first.padded[0] == slice(0, 36)  # 4 voxels of padding, cropped at 0
    assert first.ramp == (8.0, 8.0, 8.0)
    covered = np.zeros((70, 64, 40), bool)
    for t in tiles:
        covered[t.core] = True
    assert covered.all()


def test_whole_image_block_when_no_block_size():
    (only,) = tiling.tile((20, 30, 40), None, 0.25, (10, 15, 20), 2.0)
    assert only.padded == (slice(0, 20), slice(0, 30), slice(0, 40))
    assert only.field_box == (slice(0, 10), slice(0, 15), slice(0, 20))


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_weights_are_a_partition_of_unity(overlap):
    shape, factor = (64, 64, 64), 2.0
    field_shape = (32, 32, 32)
    tiles = tiling.tile(shape, 16, overlap, field_shape, factor)
    total = np.zeros(field_shape)
    for t in tiles:
        total[t.field_box] += tiling.blend_weights(t, t.field_box, shape, factor)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_field_boxes_cover_the_field_grid_for_odd_shapes():
    grid = Grid((37, 50, 23), (1.0, 1.0, 1.0))
    field = grid.coarsened(2.0)
    tiles = tiling.tile(grid.shape_zyx, 16, 0.25, field.shape_zyx, 2.0)
    covered = np.zeros(field.shape_zyx, bool)
    for t in tiles:
        covered[t.field_box] = True
    assert covered.all()
    assert (field.shape_zyx[0] - 1) * 2 >= 36  # the field reaches the last voxel centre


def test_moving_region_follows_the_previous_transform():
    fixed = Grid((40, 40, 40), (1.0, 1.0, 1.0))
    moving = Grid((80, 80, 80), (1.0, 1.0, 1.0))
    shift = AffineTransform(translation=(10.0, 0.0, 0.0))  # +10 along world x
    block = (slice(0, 20),) * 3
    region = moving_region(block, fixed, moving, shift)
    assert region[2] == slice(8, 32)  # x index 10..29, plus a margin of 2
    assert region[0] == slice(0, 22)
    far = AffineTransform(translation=(500.0, 0.0, 0.0))
    assert moving_region(block, fixed, moving, far) is None


def test_compose_with_an_affine_is_exact():
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    previous = AffineTransform(matrix=tuple(map(tuple, rotation)), translation=(1.0, 2.0, 3.0))
    rng = np.random.default_rng(0)
    points = rng.uniform(-10, 10, (5, 6, 7, 3))
    residual = rng.uniform(-1, 1, (3, 5, 6, 7))  # world (z, y, x) components
    total = compose(residual, points, previous)
    r_xyz = np.moveaxis(residual, 0, -1)[..., ::-1]
    expected = (points + r_xyz) @ rotation.T + np.array([1.0, 2.0, 3.0]) - points
    np.testing.assert_allclose(np.moveaxis(total, 0, -1)[..., ::-1], expected, atol=1e-12)


@pytest.mark.parametrize("direction", [
    ((1.0, 0.5, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),  # shear, determinant 1
    ((2.0, 0.0, 0.0), (0.0, 0.5, 0.0), (0.0, 0.0, 1.0)),  # scaling, determinant 1
])
def test_a_direction_must_be_orthonormal(direction):
    with pytest.raises(ValueError, match="orthonormal"):
        Grid((4, 4, 4), (1.0, 1.0, 1.0), direction=direction)
