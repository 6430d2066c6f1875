"""The warp's core: resampling through a field chunk by chunk, against exact references.

Real zarr stores in tmp_path. The synthetic pair's truth field is exact on the fixed
grid (factor 1), so the field values at the output voxels are the stored ones and the
reference is map_coordinates of the whole small moving array.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dreg import field as fields
from dreg.apply import warp
from dreg.errors import InputError
from dreg.grid import (
    Grid,
    components_to_vectors,
    region_shape,
    vectors_to_components,
    whole_region,
)
from dreg.io import ome_zarr, pyramid


def rotation(axis, degrees: float) -> tuple:
    """A proper rotation matrix about `axis` (Rodrigues), as nested tuples."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = np.radians(degrees)
    matrix = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    return tuple(tuple(row) for row in matrix)


GRID = Grid(
    shape_zyx=(24, 28, 32),
    spacing_xyz=(1.25, 1.0, 0.75),
    origin_xyz=(3.0, -2.0, 5.5),
    direction=rotation((1, 2, 3), 12),
)
CHUNK = 16
PAIR = {"grid": GRID, "seed": 3, "amplitude_voxels": 2.0, "shift_voxels": (1, -1.5, 2),
        "chunks": CHUNK}


def write_image(uri: str, grids: list[Grid], levels: list[np.ndarray],
                components: int | None = None) -> ome_zarr.OmeZarrImage:
    """An image whose levels hold the given arrays (one per grid)."""
    image = ome_zarr.create_image(uri, grids, levels[0].dtype, chunks=CHUNK,
                                  components=components, overwrite=True)
    for k, data in enumerate(levels):
        ome_zarr.write_region(image, k, whole_region(grids[k].shape_zyx), data)
    return image


def constant_field(uri: str, fixed_grid: Grid, displacement_xyz, moving_uri: str) -> str:
    """A field of one constant world displacement, on a grid 4 times coarser."""
    grid = fixed_grid.coarsened(4.0)
    fixed = {"uri": "fixed.ome.zarr", **fixed_grid.to_dict()}
    image = fields.create_field(uri, grid, fixed=fixed, moving_uri=moving_uri, chunks=CHUNK,
                                overwrite=True)
    components = vectors_to_components(np.asarray(displacement_xyz, dtype=float))
    data = np.broadcast_to(components[:, None, None, None], (3, *grid.shape_zyx))
    ome_zarr.write_region(image, 0, whole_region(grid.shape_zyx), data.astype(np.float32))
    return uri


def warp_all(field_uri: str, image_uri: str, out_uri: str, interpolation: str = "linear",
             level: int = 0) -> tuple[ome_zarr.OmeZarrImage, dict]:
    """Warp every output chunk with warp_chunk; the output and the summed counts."""
    field = fields.open_field(field_uri)
    image = ome_zarr.open_image(image_uri)
    lv = image.level(level)
    out = warp.create_warped(out_uri, warp.fixed_grid_of(field), lv.dtype, image.components,
                             chunks=CHUNK, overwrite=True,
                             attributes={"source": image_uri, "field": field_uri,
                                         "interpolation": interpolation})
    totals = {"voxels": 0, "source_voxels_read": 0}
    for region in ome_zarr.chunk_regions(out.levels[0].grid.shape_zyx, out.levels[0].chunks_zyx):
        counts = warp.warp_chunk(field_uri, image_uri, level, out_uri, region, interpolation)
        for key in totals:
            totals[key] += counts[key]
    return ome_zarr.open_image(out_uri), totals


def read_all(image: ome_zarr.OmeZarrImage, level: int = 0) -> np.ndarray:
    return ome_zarr.read_region(image, level, whole_region(image.level(level).grid.shape_zyx))


def truth_indices(pair: dict, input_grid: Grid) -> np.ndarray:
    """Continuous indices in `input_grid` of x + u_true(x) for every fixed voxel x."""
    truth = ome_zarr.open_image(pair["truth"])
    u = components_to_vectors(read_all(truth)).astype(float)
    points = GRID.region_points(whole_region(GRID.shape_zyx))
    return input_grid.world_to_index(points + u)


def interior(index: np.ndarray, shape_zyx, margin: float = 1.0) -> np.ndarray:
    last = np.asarray(shape_zyx) - 1
    return np.all((index >= margin) & (index <= last - margin), axis=-1)


def test_warp_through_truth_matches_exact_resampling(pair, tmp_path):
    out, totals = warp_all(pair["truth"], pair["moving"], str(tmp_path / "warped.ome.zarr"))
    moving = read_all(ome_zarr.open_image(pair["moving"]))
    index = truth_indices(pair, GRID)
    expected = ndimage.map_coordinates(moving, np.moveaxis(index, -1, 0), order=1)
    warped = read_all(out)

    inner = interior(index, GRID.shape_zyx)
    assert inner.mean() > 0.5
    assert warped.dtype == np.float32
    np.testing.assert_allclose(warped[inner], expected[inner], atol=1e-3)
    assert totals["voxels"] == np.prod(GRID.shape_zyx)
    assert 0 < totals["source_voxels_read"]
    # The warped moving image is the fixed image up to linear interpolation's error.
    fixed = read_all(ome_zarr.open_image(pair["fixed"]))
    assert np.abs(warped[inner] - fixed[inner]).mean() < 0.1 * fixed.std()
    assert out.attributes["kind"] == "warped_image"
    assert out.attributes["interpolation"] == "linear"
    assert [lv.grid for lv in out.levels] == warp.warped_grids(GRID)


def test_translation_field_shifts_by_exactly_that_amount(tmp_path):
    grid = Grid((20, 22, 26), spacing_xyz=(0.5, 1.25, 2.0), origin_xyz=(1.0, 2.0, -3.0),
                direction=rotation((0, 1, 1), 30))
    data = np.random.default_rng(0).uniform(0, 1000, grid.shape_zyx).astype(np.float32)
    image_uri = str(tmp_path / "image.ome.zarr")
    write_image(image_uri, [grid], [data])
    steps_zyx = (2, -1, 3)  # in voxels, along the index axes z, y, x
    displacement = grid.index_to_world(np.asarray(steps_zyx, float)) - grid.index_to_world(
        np.zeros(3))
    field_uri = constant_field(str(tmp_path / "field.ome.zarr"), grid, displacement, image_uri)

    out, _ = warp_all(field_uri, image_uri, str(tmp_path / "warped.ome.zarr"))
    warped = read_all(out)

    # warped[k, j, i] = data[k + 2, j - 1, i + 3] where that voxel exists, else 0.
    expected = np.zeros_like(data)
    expected[:-2, 1:, :-3] = data[2:, :-1, 3:]
    np.testing.assert_allclose(warped, expected, rtol=1e-5, atol=1e-2)
    assert np.all(warped[-2:] == 0) and np.all(warped[:, :1] == 0)


def labels_on(grid: Grid, values: np.ndarray, seed: int) -> np.ndarray:
    """Blocky uint16 labels (4-voxel cubes) drawn from `values`."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice(values, size=tuple(-(-n // 4) for n in grid.shape_zyx))
    blocks = np.kron(coarse, np.ones((4, 4, 4), dtype=coarse.dtype))
    return blocks[tuple(slice(0, n) for n in grid.shape_zyx)].astype(np.uint16)


def test_label_map_nearest_keeps_labels_dtype_and_pyramid(pair, tmp_path):
    values = np.array([0, 7, 300, 41000, 65535], dtype=np.uint16)
    labels = labels_on(GRID, values, seed=1)
    image_uri = str(tmp_path / "labels.ome.zarr")
    write_image(image_uri, [GRID], [labels])

    out, _ = warp_all(pair["truth"], image_uri, str(tmp_path / "warped.ome.zarr"), "nearest")
    warped = read_all(out)

    assert warped.dtype == np.uint16
    assert set(np.unique(warped)) <= set(values.tolist())
    assert len(np.unique(warped)) == len(values)
    # The nearest input voxel, everywhere inside.
    index = truth_indices(pair, GRID)
    inner = interior(index, GRID.shape_zyx, margin=0.0)
    nearest = np.floor(index[inner] + 0.5).astype(int)
    np.testing.assert_array_equal(warped[inner], labels[tuple(nearest.T)])

    # A label pyramid: coarser levels take every second voxel, inventing no label.
    big = Grid((70, 20, 24), spacing_xyz=(1.0, 1.0, 1.0))
    grids = warp.warped_grids(big)
    assert len(grids) == 2
    labelled = ome_zarr.create_image(str(tmp_path / "pyramid.ome.zarr"), grids, "uint16",
                                     chunks=CHUNK)
    level0 = labels_on(big, values, seed=2)
    ome_zarr.write_region(labelled, 0, whole_region(big.shape_zyx), level0)
    pyramid.build_pyramid(labelled, workers=2, method=warp.pyramid_method("nearest"))
    level1 = read_all(labelled, 1)
    assert level1.dtype == np.uint16
    np.testing.assert_array_equal(level1, level0[::2, ::2, ::2])
    assert set(np.unique(level1)) <= set(values.tolist())


def test_nearest_downsampling_of_a_vector_image_takes_every_second_voxel(tmp_path):
    grid = Grid((9, 10, 11), spacing_xyz=(1.0, 2.0, 3.0))
    grids = pyramid.pyramid_grids(grid, coarsest_longest_axis=4)
    data = np.arange(2 * 9 * 10 * 11, dtype=np.int32).reshape(2, 9, 10, 11)
    image = ome_zarr.create_image(str(tmp_path / "v.ome.zarr"), grids, "int32", chunks=4,
                                  components=2)
    ome_zarr.write_region(image, 0, whole_region(grid.shape_zyx), data)
    pyramid.build_pyramid(image, method="nearest")
    np.testing.assert_array_equal(read_all(image, 1), data[:, ::2, ::2, ::2])
    np.testing.assert_array_equal(read_all(image, 2), data[:, ::4, ::4, ::4])
    with pytest.raises(ValueError, match="method"):
        pyramid.build_pyramid(image, method="cubic")


def smooth(points_xyz: np.ndarray) -> np.ndarray:
    """A smooth closed-form image (wavelengths of about 20 world units), float32."""
    k1 = np.array([1.0, 0.5, -0.3]) / 24.0
    k2 = np.array([-0.2, 0.8, 0.6]) / 20.0
    values = 100 + 50 * np.sin(2 * np.pi * points_xyz @ k1) + 30 * np.cos(
        2 * np.pi * points_xyz @ k2 + 1.0)
    return values.astype(np.float32)


def test_input_on_a_coarser_grid_warps_like_the_full_resolution_one(pair, tmp_path):
    # Level 1 has twice the spacing and is shifted by a third of a voxel: any grid of the
    # moving space will do.
    coarse = Grid(tuple(n // 2 + 1 for n in GRID.shape_zyx),
                  spacing_xyz=tuple(2 * s for s in GRID.spacing_xyz),
                  origin_xyz=GRID.index_to_world(np.array([-0.3, 0.4, -0.2])),
                  direction=GRID.direction)
    grids = [GRID, coarse]
    levels = [smooth(g.region_points(whole_region(g.shape_zyx))) for g in grids]
    image_uri = str(tmp_path / "smooth.ome.zarr")
    write_image(image_uri, grids, levels)
    field = fields.open_field(pair["truth"])
    image = ome_zarr.open_image(image_uri)
    region = whole_region(GRID.shape_zyx)

    fine = warp.warp_region(field, image, 0, GRID, region, "linear")
    rough = warp.warp_region(field, image, 1, GRID, region, "linear")

    inner = interior(truth_indices(pair, coarse), coarse.shape_zyx)
    assert inner.mean() > 0.4
    points = GRID.region_points(region)
    exact = smooth(points + fields.sample_field(field, points))
    assert np.abs(fine[inner] - exact[inner]).max() < 2.0
    # Linear interpolation over twice the spacing: about four times the error.
    assert np.abs(rough[inner] - exact[inner]).max() < 6.0
    assert np.abs(rough[inner] - fine[inner]).mean() < 1.5


def test_vector_image_is_warped_per_channel(pair, tmp_path):
    moving = read_all(ome_zarr.open_image(pair["moving"]))
    channels = [moving, (0.5 * moving[::-1] + 7).astype(np.float32)]
    vector_uri = str(tmp_path / "vector.ome.zarr")
    write_image(vector_uri, [GRID], [np.stack(channels)], components=2)
    scalars = []
    for c, data in enumerate(channels):
        uri = str(tmp_path / f"channel{c}.ome.zarr")
        write_image(uri, [GRID], [data])
        scalars.append(read_all(warp_all(pair["truth"], uri, uri + ".warped")[0]))

    out, _ = warp_all(pair["truth"], vector_uri, str(tmp_path / "warped.ome.zarr"))
    warped = read_all(out)

    assert out.components == 2 and warped.shape == (2, *GRID.shape_zyx)
    for c in range(2):
        np.testing.assert_allclose(warped[c], scalars[c], rtol=1e-6)
    assert not np.allclose(warped[0], warped[1])


def test_points_mapping_outside_the_input_give_zero(pair, tmp_path):
    far = 10 * np.ptp(np.stack(GRID.world_bounds()), axis=0)
    field_uri = constant_field(str(tmp_path / "far.ome.zarr"), GRID, far, pair["moving"])

    out, totals = warp_all(field_uri, pair["moving"], str(tmp_path / "warped.ome.zarr"))

    assert np.all(read_all(out) == 0)
    assert totals["source_voxels_read"] == 0

    # Half outside: a shift by half the image along x leaves the other half empty.
    half = GRID.index_to_world(np.array([0, 0, 16.0])) - GRID.index_to_world(np.zeros(3))
    field_uri = constant_field(str(tmp_path / "half.ome.zarr"), GRID, half, pair["moving"])
    warped = read_all(warp_all(field_uri, pair["moving"], str(tmp_path / "half.warped"))[0])
    assert np.all(warped[..., 16:] == 0)
    assert np.all(warped[..., :16] != 0)


def test_small_source_budget_splits_and_gives_the_same_result(pair, monkeypatch):
    field = fields.open_field(pair["truth"])
    image = ome_zarr.open_image(pair["moving"])
    region = ((slice(4, 20), slice(6, 22), slice(8, 28)))
    whole = warp.warp_region(field, image, 0, GRID, region, "linear")

    boxes = []
    real_read = ome_zarr.read_region

    def recording_read(source, level, box):
        if source.uri == image.uri:  # the field's reads go through read_region too
            boxes.append(region_shape(box))
        return real_read(source, level, box)

    monkeypatch.setattr(ome_zarr, "read_region", recording_read)
    split = warp.warp_region(field, image, 0, GRID, region, "linear", max_source_voxels=64)
    split_nearest = warp.warp_region(field, image, 0, GRID, region, "nearest",
                                     max_source_voxels=64)
    monkeypatch.undo()

    assert len(boxes) > 20
    # Only single voxels may exceed the budget (their box is at most 2 x 2 x 2 anyway).
    assert max(np.prod(b) for b in boxes) <= 64
    np.testing.assert_allclose(split, whole, rtol=1e-6)
    nearest = warp.warp_region(field, image, 0, GRID, region, "nearest")
    np.testing.assert_array_equal(split_nearest, nearest)


def test_unknown_interpolation_is_an_input_error(pair):
    field = fields.open_field(pair["truth"])
    image = ome_zarr.open_image(pair["moving"])
    with pytest.raises(InputError, match="interpolation"):
        warp.warp_region(field, image, 0, GRID, whole_region((1, 1, 1)), "cubic")


def test_check_overlap(pair, tmp_path):
    field = fields.open_field(pair["truth"])
    warp.check_image_meets_field(ome_zarr.open_image(pair["moving"]), field)

    far_grid = Grid(GRID.shape_zyx, GRID.spacing_xyz, origin_xyz=(5000.0, 0.0, 0.0),
                    direction=GRID.direction)
    far_uri = str(tmp_path / "far.ome.zarr")
    write_image(far_uri, [far_grid], [np.ones(far_grid.shape_zyx, np.float32)])
    with pytest.raises(InputError, match="does not meet") as error:
        warp.check_image_meets_field(ome_zarr.open_image(far_uri), field)
    assert "far.ome.zarr" in str(error.value)


# ---------------------------------------------------------------- the compiled warp's bits


def reference_warp(field, image, level: int, out_grid: Grid, region, interpolation: str):
    """The warp as dreg computed it before its compiled kernels (NumPy and SciPy): the
    output voxels' world points, u sampled there, the moved points' input indices, the
    points within OUTSIDE_TOLERANCE clipped on (rounded for nearest), then SciPy's
    map_coordinates(order=1) in float64, or plain indexing for nearest."""
    points = out_grid.region_points(region)
    lv = image.level(level)
    index = lv.grid.world_to_index(points + fields.sample_field(field, points))
    last = np.asarray(lv.grid.shape_zyx) - 1
    tol = warp.OUTSIDE_TOLERANCE
    inside = np.all((index >= -tol) & (index <= last + tol), axis=-1)
    placed = np.clip(index[inside], 0, last)
    if interpolation == "nearest":
        placed = np.floor(placed + 0.5)
    lead = () if image.components is None else (image.components,)
    out = np.zeros((*lead, *index.shape[:-1]), dtype=lv.dtype)
    if not inside.any():
        return out
    lo = np.floor(placed.min(axis=0)).astype(int)
    hi = np.ceil(placed.max(axis=0)).astype(int) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    data = ome_zarr.read_region(image, level, box)
    coords = np.ascontiguousarray((placed - lo).T)
    for c, target in enumerate(out if lead else [out]):
        values = data[c] if lead else data
        if interpolation == "nearest":
            target[inside] = values[tuple(coords.astype(np.intp))]
            continue
        sampled = ndimage.map_coordinates(values, coords, order=1, mode="nearest",
                                          output=np.float64)
        if np.issubdtype(out.dtype, np.integer):
            info = np.iinfo(out.dtype)
            sampled = np.clip(np.rint(sampled), info.min, info.max)
        target[inside] = sampled.astype(out.dtype)
    return out


AXIS_ALIGNED = Grid(shape_zyx=(22, 26, 30), spacing_xyz=(0.8, 1.1, 1.3),
                    origin_xyz=(-4.2, 1.7, 0.35))
# The input: its own spacing and origin, a little smaller than the mapped region, so that
# points fall outside it and on its border.
INPUT_GRID = Grid(shape_zyx=(20, 24, 26), spacing_xyz=(0.9, 1.05, 1.2),
                  origin_xyz=(-3.1, 2.2, 0.9))


def smooth_field(uri: str, fixed_grid: Grid, seed: int, amplitude: float = 2.5) -> str:
    """A smooth random field at spacing factor 2 (as a registration writes it), with
    displacements of a few world units."""
    grid = fixed_grid.coarsened(2.0)
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(3, *(-(-n // 4) + 1 for n in grid.shape_zyx)))
    zoom = [1] + [n / (m - 1) for n, m in zip(grid.shape_zyx, coarse.shape[1:], strict=True)]
    data = ndimage.zoom(coarse, zoom, order=3)[(slice(None),) + tuple(
        slice(0, n) for n in grid.shape_zyx)]
    image = fields.create_field(uri, grid, fixed={"uri": "f", **fixed_grid.to_dict()},
                                moving_uri="m", chunks=8, overwrite=True)
    ome_zarr.write_region(image, 0, whole_region(grid.shape_zyx),
                          (amplitude * data).astype(np.float32))
    return uri


@pytest.mark.parametrize("dtype, interpolation", [
    ("float32", "linear"), ("float64", "linear"), ("uint16", "linear"), ("int8", "linear"),
    ("int64", "linear"), ("uint16", "nearest"), ("int64", "nearest"), ("uint64", "nearest"),
    ("float32", "nearest"),
])
def test_compiled_warp_gives_the_numpy_and_scipy_bits(tmp_path, dtype, interpolation):
    """On axis-aligned grids the compiled passes compute what NumPy and SciPy computed,
    bit for bit, for every dtype; 64-bit labels beyond 2**53 are copied exactly."""
    field = fields.open_field(smooth_field(str(tmp_path / "field.ome.zarr"), AXIS_ALIGNED, 5))
    rng = np.random.default_rng(7)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=INPUT_GRID.shape_zyx, dtype=dtype,
                            endpoint=True)
        if np.dtype(dtype).itemsize == 8:
            data[::3] = np.array(info.max - 12345, dtype=dtype)  # beyond float64's 2**53
    else:
        data = (rng.normal(size=INPUT_GRID.shape_zyx) * 100).astype(dtype)
    image = write_image(str(tmp_path / "input.ome.zarr"), [INPUT_GRID], [data])
    for region in [whole_region(AXIS_ALIGNED.shape_zyx),
                   (slice(3, 19), slice(0, 16), slice(16, 30))]:
        ours = warp.warp_region(field, image, 0, AXIS_ALIGNED, region, interpolation)
        theirs = reference_warp(field, image, 0, AXIS_ALIGNED, region, interpolation)
        assert ours.dtype == theirs.dtype == np.dtype(dtype)
        assert (ours != 0).mean() > 0.5 and (ours == 0).any()  # inside and outside met
        np.testing.assert_array_equal(ours, theirs)


def test_compiled_warp_of_a_vector_image_and_an_oblique_grid(pair, tmp_path):
    """A vector image gives the reference's bits on axis-aligned grids. With oblique
    directions NumPy's matrix products may round differently from the compiled loop in
    the last bit of an index: linear values then agree to float32 rounding."""
    field = fields.open_field(smooth_field(str(tmp_path / "field.ome.zarr"), AXIS_ALIGNED, 6))
    rng = np.random.default_rng(8)
    data = rng.normal(size=(2, *INPUT_GRID.shape_zyx)).astype(np.float32)
    image = write_image(str(tmp_path / "vector.ome.zarr"), [INPUT_GRID], [data], components=2)
    region = whole_region(AXIS_ALIGNED.shape_zyx)
    for interpolation in warp.INTERPOLATIONS:
        np.testing.assert_array_equal(
            warp.warp_region(field, image, 0, AXIS_ALIGNED, region, interpolation),
            reference_warp(field, image, 0, AXIS_ALIGNED, region, interpolation))
    truth = fields.open_field(pair["truth"])
    moving = ome_zarr.open_image(pair["moving"])
    region = whole_region(GRID.shape_zyx)
    ours = warp.warp_region(truth, moving, 0, GRID, region, "linear")
    theirs = reference_warp(truth, moving, 0, GRID, region, "linear")
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5)
    nearest = warp.warp_region(truth, moving, 0, GRID, region, "nearest")
    # A different voxel only where an index lies within rounding of a half.
    assert (nearest != reference_warp(truth, moving, 0, GRID, region, "nearest")).mean() < 1e-3


def test_a_batch_writes_each_chunk_once_under_its_own_mark(pair, tmp_path):
    """warp_batch decodes each input chunk once for the batch, writes what warp_chunk
    writes, and skips the chunks already marked (a retried or resumed batch)."""
    from dreg.io import completion
    from dreg.io.batches import chunk_batches, chunk_region

    field = fields.open_field(pair["truth"])
    image = ome_zarr.open_image(pair["moving"])
    single, _ = warp_all(pair["truth"], pair["moving"], str(tmp_path / "single.ome.zarr"))
    out = warp.create_warped(str(tmp_path / "batch.ome.zarr"), warp.fixed_grid_of(field),
                             image.levels[0].dtype, None, chunks=CHUNK, overwrite=True)
    lv = out.levels[0]
    batches = chunk_batches(lv.grid.shape_zyx, lv.chunks_zyx, workers=1)
    indices = sorted(i for b in batches for i in b)
    assert indices == list(range(len(list(ome_zarr.chunk_regions(lv.grid.shape_zyx,
                                                                 lv.chunks_zyx)))))
    token = "0123456789abcdef0123456789abcdef"
    named = [(f"0-{i}", chunk_region(lv.grid.shape_zyx, lv.chunks_zyx, i)) for i in indices]
    assert [r for _, r in named] == list(ome_zarr.chunk_regions(lv.grid.shape_zyx,
                                                                lv.chunks_zyx))
    first = warp.warp_batch(pair["truth"], pair["moving"], 0, out.uri, named[:3], "linear",
                            token)
    ome_zarr.write_region(out, 0, named[0][1], np.full(region_shape(named[0][1]), -1.0))
    results = warp.warp_batch(pair["truth"], pair["moving"], 0, out.uri, named, "linear",
                              token)
    assert results[:3] == first
    assert sum(r["voxels"] for r in results) == np.prod(GRID.shape_zyx)
    assert completion.chunk_result(out.uri, token, named[-1][0]) == results[-1]
    warped = read_all(out)
    assert np.all(warped[named[0][1]] == -1)  # marked written: not written again
    rest = np.ones(warped.shape, bool)
    rest[named[0][1]] = False
    np.testing.assert_array_equal(warped[rest], read_all(single)[rest])


def test_chunk_cache_reads_what_zarr_reads_decoding_each_chunk_once(pair):
    from dreg.io.chunk_cache import ChunkCache

    image = ome_zarr.open_image(pair["moving"])
    cache = ChunkCache(image, 0)
    boxes = [(slice(3, 20), slice(5, 28), slice(0, 17)), (slice(0, 24), slice(14, 28),
                                                         slice(9, 32)), (slice(7, 8),) * 3]
    for box in boxes:
        np.testing.assert_array_equal(cache.read_region(box), ome_zarr.read_region(image, 0,
                                                                                   box))
    assert cache.decoded == len(list(ome_zarr.chunk_regions(GRID.shape_zyx, (CHUNK,) * 3)))
    small = ChunkCache(image, 0, max_bytes=1)  # keeps only the chunks of the last box
    for box in boxes:
        np.testing.assert_array_equal(small.read_region(box), ome_zarr.read_region(image, 0,
                                                                                   box))
    assert len(small._kept) == 1


def test_pyramid_batches_write_what_chunk_by_chunk_writes(tmp_path):
    from dreg.io.batches import chunk_batches, chunk_region

    grid = Grid(shape_zyx=(40, 36, 50), spacing_xyz=(1.0, 0.5, 2.0), origin_xyz=(1, 2, 3))
    data = np.random.default_rng(2).normal(size=grid.shape_zyx).astype(np.float32)
    grids = pyramid.pyramid_grids(grid, coarsest_longest_axis=8)
    token = "fedcba9876543210fedcba9876543210"
    for method in pyramid.DOWNSAMPLE_METHODS:
        one = ome_zarr.create_image(str(tmp_path / f"one-{method}.ome.zarr"), grids,
                                    "float32", chunks=8, overwrite=True)
        batched = ome_zarr.create_image(str(tmp_path / f"b-{method}.ome.zarr"), grids,
                                        "float32", chunks=8, overwrite=True)
        for image in (one, batched):
            ome_zarr.write_region(image, 0, whole_region(grid.shape_zyx), data)
        pyramid.build_pyramid(one, workers=1, method=method)
        for level in range(1, len(grids)):
            lv = batched.levels[level]
            for batch in chunk_batches(lv.grid.shape_zyx, lv.chunks_zyx, workers=2):
                pyramid.downsample_batch(batched.uri, level, [
                    (f"{level}-{i}", chunk_region(lv.grid.shape_zyx, lv.chunks_zyx, i))
                    for i in batch], method, token)
            np.testing.assert_array_equal(read_all(batched, level), read_all(one, level))
