"""The reduce step on hand-made block results: blending, renormalisation, composition."""

from __future__ import annotations

import numpy as np
import pytest

from dreg.grid import Grid, region_shape
from dreg.io import ome_zarr
from dreg.registration import tiling
from dreg.registration.outcome import FAILED, OK, BlockResult, save_residual
from dreg.transform import field
from dreg.transform.field import AffineTransform
from dreg.transform.reduce import blocks_for_chunk, reduce_chunk

GRID = Grid((32, 32, 64), (1.0, 1.0, 1.0))
FACTOR = 2.0


def two_blocks(tmp_path, values, statuses=(OK, OK)):
    """Two blocks side by side along x, each with a constant residual along world x."""
    field_grid = GRID.coarsened(FACTOR)
    tiles = tiling.tile(GRID.shape_zyx, (32, 32, 32), 0.25, field_grid.shape_zyx, FACTOR)
    results = []
    for tile, value, status in zip(tiles, values, statuses, strict=True):
        shape = region_shape(tile.field_box)
        residual = np.zeros((3, *shape), np.float32)
        residual[2] = value
        uri = str(tmp_path / f"{tile.name}.npy")
        save_residual(uri, residual)
        results.append(BlockResult(tile, status, residual_uri=uri if status == OK else None))
    return field_grid, results


IDENTITY = AffineTransform.identity()


def reduce_all(tmp_path, field_grid, results, previous=IDENTITY):
    uri = str(tmp_path / "field.ome.zarr")
    field.create_field(uri, field_grid, chunks=16, overwrite=True)
    for chunk in ome_zarr.chunk_regions(field_grid.shape_zyx, (16, 16, 16)):
        reduce_chunk(blocks_for_chunk(results, chunk), chunk, field_grid, GRID.shape_zyx,
                     FACTOR, previous, [uri])
    return ome_zarr.read_region(field.open_field(uri), 0,
                                tuple(slice(0, n) for n in field_grid.shape_zyx))


def test_disagreeing_blocks_blend_linearly_without_a_jump(tmp_path):
    field_grid, results = two_blocks(tmp_path, (0.0, 1.0))
    u_x = reduce_all(tmp_path, field_grid, results)[2]
    profile = u_x[5, 5]
    assert profile[0] == 0 and profile[-1] == 1
    # The overlap spans fixed x 28..36 (padding 4 each side): field voxels 14..18.
    np.testing.assert_allclose(profile[14:19], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    assert np.abs(np.diff(profile)).max() <= 0.25 + 1e-6
    assert np.all(u_x == u_x[:1, :1, :])  # uniform across y and z


def test_failed_neighbour_is_renormalised_and_the_rest_falls_back(tmp_path):
    field_grid, results = two_blocks(tmp_path, (0.5, 9.0), statuses=(OK, FAILED))
    previous = AffineTransform(translation=(0.0, 0.0, 2.0))  # u_prev = 2 along world z
    u = reduce_all(tmp_path, field_grid, results, previous)
    # Up to its padded edge (fixed x 36, field voxel 18) the surviving block counts fully,
    # then the previous transform alone.
    np.testing.assert_allclose(u[2, 3, 3, :18], 0.5, atol=1e-6)
    np.testing.assert_allclose(u[2, 3, 3, 19:], 0.0, atol=1e-6)
    np.testing.assert_allclose(u[0], 2.0, atol=1e-6)


def test_composition_samples_the_previous_field_at_the_moved_point(tmp_path):
    field_grid, results = two_blocks(tmp_path, (1.0, 1.0))
    # A previous field whose x displacement grows linearly with x: u_prev_x = 0.1 x.
    prev_uri = str(tmp_path / "prev.ome.zarr")
    prev = field.create_field(prev_uri, field_grid, chunks=16)
    points = field_grid.region_points(tuple(slice(0, n) for n in field_grid.shape_zyx))
    values = np.zeros((3, *field_grid.shape_zyx), np.float32)
    values[2] = 0.1 * points[..., 0]
    ome_zarr.write_region(prev, 0, tuple(slice(0, n) for n in field_grid.shape_zyx), values)
    u = reduce_all(tmp_path, field_grid, results, prev_uri)
    # u(x) = r + u_prev(x + r) = 1 + 0.1 (x + 1), exact for a linear field.
    expected = 1.0 + 0.1 * (points[..., 0] + 1.0)
    inner = (slice(None), slice(None), slice(0, -1))  # the last voxel holds the border value
    np.testing.assert_allclose(u[2][inner], expected[inner], atol=1e-5)


@pytest.mark.parametrize("status", [OK, FAILED])
def test_chunks_only_receive_blocks_that_reach_them(tmp_path, status):
    _, results = two_blocks(tmp_path, (0.0, 1.0), statuses=(OK, status))
    far_left = (slice(0, 4), slice(0, 4), slice(0, 4))
    assert [r.block.index for r in blocks_for_chunk(results, far_left)] == [(0, 0, 0)]
