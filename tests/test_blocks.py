"""Unit tests of the block grid, blending weights, the moving region and composition."""

from __future__ import annotations

import numpy as np
import pytest

from dreg import blocks
from dreg.field import AffineTransform
from dreg.grid import Grid
from dreg.reduce import compose
from dreg.register_block import moving_region


def test_tiles_cover_the_image_with_cropped_padding():
    tiles = blocks.tile((70, 64, 40), 32, 0.25, (35, 32, 20), 2.0)
    assert [t.index for t in tiles][:2] == [(0, 0, 0), (0, 1, 0)]
    # 70 = 32 + 38: the 6-voxel remainder joins the last core; 40 is one block along x.
    assert sorted({t.core[0] for t in tiles}) == [(0, 32), (32, 70)]
    assert {t.core[2] for t in tiles} == {(0, 40)}
    first = tiles[0]
    assert first.padded[0] == (0, 36)  # 4 voxels of padding, cropped at 0
    assert first.ramp == (8.0, 8.0, 8.0)
    covered = np.zeros((70, 64, 40), bool)
    for t in tiles:
        covered[blocks.to_slices(t.core)] = True
    assert covered.all()


def test_whole_image_block_when_no_block_size():
    (only,) = blocks.tile((20, 30, 40), None, 0.25, (10, 15, 20), 2.0)
    assert only.padded == ((0, 20), (0, 30), (0, 40))
    assert only.field_box == ((0, 10), (0, 15), (0, 20))


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_weights_are_a_partition_of_unity(overlap):
    shape, factor = (64, 64, 64), 2.0
    field_shape = (32, 32, 32)
    tiles = blocks.tile(shape, 16, overlap, field_shape, factor)
    total = np.zeros(field_shape)
    for t in tiles:
        total[blocks.to_slices(t.field_box)] += blocks.blend_weights(t, t.field_box, shape, factor)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_field_boxes_cover_the_field_grid_for_odd_shapes():
    grid = Grid((37, 50, 23), (1.0, 1.0, 1.0))
    field = grid.coarsened(2.0)
    tiles = blocks.tile(grid.shape_zyx, 16, 0.25, field.shape_zyx, 2.0)
    covered = np.zeros(field.shape_zyx, bool)
    for t in tiles:
        covered[blocks.to_slices(t.field_box)] = True
    assert covered.all()
    assert (field.shape_zyx[0] - 1) * 2 >= 36  # the field reaches the last voxel centre


def test_moving_region_follows_the_previous_transform():
    fixed = Grid((40, 40, 40), (1.0, 1.0, 1.0))
    moving = Grid((80, 80, 80), (1.0, 1.0, 1.0))
    shift = AffineTransform(translation=(10.0, 0.0, 0.0))  # +10 along world x
    region = moving_region(((0, 20), (0, 20), (0, 20)), fixed, moving, shift)
    assert region[2] == (8, 32)  # x index 10..29, plus a margin of 2
    assert region[0] == (0, 22)
    far = AffineTransform(translation=(500.0, 0.0, 0.0))
    assert moving_region(((0, 20), (0, 20), (0, 20)), fixed, moving, far) is None


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
