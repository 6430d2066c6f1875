"""The reduce step on hand-made block results: blending, renormalisation, composition;
the compiled loops against the plain NumPy/SciPy formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dreg import field
from dreg.field import AffineTransform, trilinear
from dreg.grid import (
    Grid,
    components_to_vectors,
    intersect_regions,
    region_shape,
    relative_region,
    vectors_to_components,
)
from dreg.io import ome_zarr
from dreg.registration import tiling
from dreg.registration.outcome import FAILED, OK, BlockResult, load_residual, save_residual
from dreg.registration.reduce import (
    blend_residuals,
    blocks_for_chunk,
    compose_on_grid,
    reduce_chunk,
    reduce_chunks,
)

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


# ---------------------------------------------------------------- the compiled fast path


def reference_weights(block, box, image_shape_zyx, factor):
    """A block's blending weights written out plainly in NumPy, dense (z, y, x)."""
    weights = []
    for axis, (padded, part) in enumerate(zip(block.padded, box, strict=True)):
        t = np.arange(part.start, part.stop, dtype=float) * factor
        w = np.ones_like(t)
        if block.ramp[axis] > 0 and padded.start > 0:
            w = np.minimum(w, (t - padded.start) / block.ramp[axis])
        if block.ramp[axis] > 0 and padded.stop < image_shape_zyx[axis]:
            w = np.minimum(w, (padded.stop - t) / block.ramp[axis])
        weights.append(np.clip(w, 0.0, 1.0))
    return weights[0][:, None, None] * weights[1][None, :, None] * weights[2][None, None, :]


def reference_blend(results, chunk, image_shape_zyx, factor):
    """The blend written out plainly in NumPy: weights as a dense product, float32."""
    shape = region_shape(chunk)
    numerator = np.zeros((3, *shape), np.float32)
    denominator = np.zeros(shape, np.float32)
    for result in results:
        overlap = intersect_regions(result.block.field_box, chunk)
        if result.status != OK or overlap is None:
            continue
        residual = load_residual(result.residual_uri)
        source = (slice(None), *relative_region(overlap, result.block.field_box))
        target = relative_region(overlap, chunk)
        weight = reference_weights(result.block, overlap, image_shape_zyx, factor)
        np.testing.assert_array_equal(
            tiling.blend_weights(result.block, overlap, image_shape_zyx, factor), weight)
        numerator[(slice(None),) + target] += residual[source] * weight.astype(np.float32)
        denominator[target] += weight.astype(np.float32)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                     where=denominator > 0)


def reference_compose(residual, chunk, field_grid, previous):
    """u(x) = r(x) + u_prev(x + r(x)) written out plainly: world points, then SciPy's
    trilinear interpolation (nearest-border hold) of the previous field's whole array."""
    r_xyz = components_to_vectors(residual)
    moved = field_grid.region_points(chunk) + r_xyz
    if isinstance(previous, AffineTransform):
        u_prev = previous.displacement(moved)
    else:
        grid = previous.levels[0].grid
        data = ome_zarr.read_region(previous, 0, tuple(slice(0, n) for n in grid.shape_zyx))
        index = grid.world_to_index(moved.reshape(-1, 3)).T
        u_prev = components_to_vectors(np.stack([
            ndimage.map_coordinates(data[c], index, order=1, mode="nearest")
            for c in range(3)]).reshape(residual.shape))
    return vectors_to_components(r_xyz + u_prev).astype(np.float32)


def random_stage(tmp_path, rng):
    """An oblique image grid, blocks with random residuals (some failed), and a random
    previous field on a coarser, shifted grid that the moved points overrun."""
    angle = 0.3
    direction = ((np.cos(angle), -np.sin(angle), 0.0), (np.sin(angle), np.cos(angle), 0.0),
                 (0.0, 0.0, 1.0))
    image = Grid((40, 36, 44), (0.8, 1.1, 1.3), (2.0, -3.0, 5.0), direction)
    factor = 3.0
    field_grid = image.coarsened(factor)
    blocks = tiling.tile(image.shape_zyx, (16, 20, 16), 0.3, field_grid.shape_zyx, factor)
    results = []
    for block in blocks:
        status = FAILED if rng.random() < 0.15 else OK
        uri = None
        if status == OK:
            uri = str(tmp_path / f"{block.name}.npy")
            shape = (3, *region_shape(block.field_box))
            save_residual(uri, rng.normal(scale=2.5, size=shape).astype(np.float32))
        results.append(BlockResult(block, status, residual_uri=uri))
    previous_grid = Grid((9, 8, 10), (4.0, 4.5, 5.0), (4.0, -1.0, 8.0), direction)
    previous = field.create_field(str(tmp_path / "previous.ome.zarr"), previous_grid, chunks=4)
    whole = tuple(slice(0, n) for n in previous_grid.shape_zyx)
    ome_zarr.write_region(previous, 0, whole,
                          rng.normal(scale=3.0, size=(3, *previous_grid.shape_zyx)))
    return image, field_grid, factor, results, previous.uri


def test_compiled_reduce_equals_the_plain_numpy_formulas_on_random_data(tmp_path):
    rng = np.random.default_rng(7)
    image, field_grid, factor, results, previous_uri = random_stage(tmp_path, rng)
    previous = field.open_field(previous_uri)
    affine = AffineTransform(((1.02, 0.03, -0.01), (-0.02, 0.97, 0.04), (0.01, 0.0, 1.05)),
                             (1.5, -2.0, 0.7))
    out = str(tmp_path / "field.ome.zarr")
    field.create_field(out, field_grid, chunks=5, overwrite=True)
    for chunk in ome_zarr.chunk_regions(field_grid.shape_zyx, (5, 5, 5)):
        reaching = blocks_for_chunk(results, chunk)
        blended = blend_residuals(reaching, chunk, image.shape_zyx, factor)
        # Blending: the same float32 operations in the same order, so the same bits.
        np.testing.assert_array_equal(
            blended, reference_blend(reaching, chunk, image.shape_zyx, factor))
        for prev in (previous, affine):
            expected = reference_compose(blended, chunk, field_grid, prev)
            # Composition: the same formulas; the points' float64 sums may round apart
            # in the last bit, which float32 almost never shows.
            np.testing.assert_allclose(compose_on_grid(blended, chunk, field_grid, prev),
                                       expected, rtol=1e-6, atol=1e-6)
        reduce_chunk(reaching, chunk, field_grid, image.shape_zyx, factor, previous_uri, [out])
        np.testing.assert_allclose(
            ome_zarr.read_region(field.open_field(out), 0, chunk),
            reference_compose(blended, chunk, field_grid, previous), rtol=1e-6, atol=1e-6)


def test_batches_of_chunks_write_what_chunk_by_chunk_writes(tmp_path):
    """The flow reduces a stage in batches of chunks (one task run each, dreg.io.batches):
    every chunk is written bit for bit as on its own, and the counts add up."""
    from dreg.io.batches import region_batches

    rng = np.random.default_rng(11)
    image, field_grid, factor, results, previous_uri = random_stage(tmp_path, rng)
    chunks = list(ome_zarr.chunk_regions(field_grid.shape_zyx, (5, 5, 5)))
    one, batched = (str(tmp_path / f"{name}.ome.zarr") for name in ("one", "batched"))
    for uri in (one, batched):
        field.create_field(uri, field_grid, chunks=5, overwrite=True)
    for chunk in chunks:
        reduce_chunk(blocks_for_chunk(results, chunk), chunk, field_grid, image.shape_zyx,
                     factor, previous_uri, [one])
    batches = region_batches(chunks, workers=2)
    assert len(batches) > 1 and sorted(i for b in batches for i in b) == list(range(len(chunks)))
    totals = [reduce_chunks([(chunks[i], blocks_for_chunk(results, chunks[i])) for i in batch],
                            field_grid, image.shape_zyx, factor, previous_uri, [batched])
              for batch in batches]
    assert sum(t["chunks"] for t in totals) == len(chunks)
    assert sum(t["voxels"] for t in totals) == int(np.prod(field_grid.shape_zyx))
    whole = tuple(slice(0, n) for n in field_grid.shape_zyx)
    np.testing.assert_array_equal(ome_zarr.read_region(field.open_field(batched), 0, whole),
                                  ome_zarr.read_region(field.open_field(one), 0, whole))


def test_compiled_sampling_gives_scipys_bits_inside_on_and_beyond_the_border():
    rng = np.random.default_rng(3)
    for shape in ((3, 7, 8, 9), (3, 1, 5, 2)):
        data = rng.normal(size=shape).astype(np.float32)
        data[1, -2:, :, 1] = np.nan  # NaN (a voxel without preimage) next to the border
        upper = np.array(shape[1:], float)[:, None] - 1
        index = rng.uniform(-3.0, 1.0, size=(3, 20000)) * (upper + 4) + 0.5
        index[:, :50] = np.floor(index[:, :50])  # whole indices, borders among them
        index[:, 50:53] = upper  # the far corner exactly
        expected = np.stack([ndimage.map_coordinates(data[c], index, order=1, mode="nearest")
                             for c in range(shape[0])])
        np.testing.assert_array_equal(trilinear.sample(data, index), expected)


@pytest.mark.s3
def test_a_stage_on_s3_reduces_to_the_same_field_as_on_local_files(tmp_path, s3):
    """Residuals, previous field and output on S3 (residuals fetched several at a time,
    the previous field read through zarr): the same field, bit for bit."""
    rng = np.random.default_rng(11)
    image, field_grid, factor, results, previous_uri = random_stage(tmp_path, rng)
    on_s3 = []
    for result in results:
        uri = None
        if result.residual_uri:
            uri = s3.uri("reduce", Path(result.residual_uri).name)
            save_residual(uri, load_residual(result.residual_uri))
        on_s3.append(BlockResult(result.block, result.status, residual_uri=uri))
    previous = field.open_field(previous_uri)
    whole = tuple(slice(0, n) for n in previous.levels[0].grid.shape_zyx)
    previous_s3 = field.create_field(s3.uri("reduce", "previous.ome.zarr"),
                                     previous.levels[0].grid, chunks=4, overwrite=True)
    ome_zarr.write_region(previous_s3, 0, whole, ome_zarr.read_region(previous, 0, whole))
    fields = {}
    for name, stage_results, prev, out in (
            ("local", results, previous_uri, str(tmp_path / "local.ome.zarr")),
            ("s3", on_s3, previous_s3.uri, s3.uri("reduce", "field.ome.zarr"))):
        field.create_field(out, field_grid, chunks=5, overwrite=True)
        for chunk in ome_zarr.chunk_regions(field_grid.shape_zyx, (5, 5, 5)):
            reduce_chunk(blocks_for_chunk(stage_results, chunk), chunk, field_grid,
                         image.shape_zyx, factor, prev, [out])
        fields[name] = ome_zarr.read_region(
            field.open_field(out), 0, tuple(slice(0, n) for n in field_grid.shape_zyx))
    np.testing.assert_array_equal(fields["s3"], fields["local"])

