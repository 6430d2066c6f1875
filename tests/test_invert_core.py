"""The inverse field's core: fixed-point inversion, NaN where there is no preimage,
round-trip statistics and their merge, chunk by chunk on real zarr stores."""

from __future__ import annotations

import numpy as np
import pytest

from dreg import field, synth
from dreg.apply import invert
from dreg.grid import Grid, region_from_bounds, vectors_to_components, whole_region
from dreg.io import ome_zarr


def rotation_zx(degrees_z: float, degrees_x: float) -> np.ndarray:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def as_direction(matrix: np.ndarray) -> tuple:
    return tuple(tuple(row) for row in matrix)


def write_field(path, grid: Grid, displacement, fixed_grid: Grid | None = None,
                chunks: int = 16) -> ome_zarr.OmeZarrImage:
    """A forward field on `grid` holding displacement(points) (world xyz vectors)."""
    uri = str(path)
    fixed = {"uri": "fixed.ome.zarr", **(fixed_grid or grid).to_dict()}
    image = field.create_field(uri, grid, fixed=fixed, moving_uri="moving.ome.zarr",
                               chunks=chunks, overwrite=True)
    region = whole_region(grid.shape_zyx)
    ome_zarr.write_region(image, 0, region,
                          vectors_to_components(displacement(grid.region_points(region))))
    return field.open_field(uri)


def read_whole(image: ome_zarr.OmeZarrImage) -> np.ndarray:
    return ome_zarr.read_region(image, 0, whole_region(image.levels[0].grid.shape_zyx))


def affine(matrix: np.ndarray, centre: np.ndarray, shift: np.ndarray):
    """u and the exact inverse displacement v of moving = centre + M (x - centre) + shift."""
    inverse = np.linalg.inv(matrix)

    def forward(points):
        return (points - centre) @ (matrix - np.eye(3)).T + shift

    def backward(points):
        return centre + (points - centre - shift) @ inverse.T - points

    return forward, backward


def preimage_index(grid: Grid, points: np.ndarray, v_exact: np.ndarray) -> np.ndarray:
    """Continuous field-grid indices (..., 3) of the exact preimages."""
    return grid.world_to_index(points + v_exact)


def within(index: np.ndarray, shape, lo: float, hi_from_end: float) -> np.ndarray:
    """Whether every index lies in [lo, n - 1 - hi_from_end]."""
    return np.all((index >= lo) & (index <= np.asarray(shape) - 1 - hi_from_end), axis=-1)


# ----------------------------------------------------------------------------- translation

GRID = Grid((12, 14, 16), (1.0, 1.0, 1.0))
SHIFT_XYZ = np.array([2.3, -1.2, 0.0])  # moving = fixed + 2.3 along x, -1.2 along y


def test_translation_inverts_to_minus_the_shift_and_nan_where_it_leaves(tmp_path):
    forward = write_field(tmp_path / "u.ome.zarr", GRID, lambda p: np.broadcast_to(
        SHIFT_XYZ, p.shape))
    v, stats = invert.invert_region(forward, GRID, whole_region(GRID.shape_zyx))
    assert v.dtype == np.float32 and v.shape == (3, *GRID.shape_zyx)
    k, j, i = np.meshgrid(*[np.arange(n) for n in GRID.shape_zyx], indexing="ij")
    # The preimage of x-index i is i - 2.3: off the low-x side for i < 2 (beyond half a
    # voxel); of y-index j it is j + 1.2: off the high-y side for j > 12.
    expected_nan = (i < 2) | (j > 12)
    assert np.array_equal(np.isnan(v).any(axis=0), expected_nan)
    assert np.array_equal(np.isnan(v).all(axis=0), expected_nan)  # all components or none
    valid = ~expected_nan
    np.testing.assert_allclose(v[:, valid].T, np.broadcast_to([0.0, 1.2, -2.3],
                                                              (valid.sum(), 3)), atol=1e-5)
    assert stats["voxels"] == GRID.shape_zyx[0] * 14 * 16
    assert stats["nan"] == int(expected_nan.sum())
    assert stats["max"] < 1e-5


def test_far_outside_point_is_nan_never_zero(tmp_path):
    forward = write_field(tmp_path / "u.ome.zarr", GRID, lambda p: np.broadcast_to(
        SHIFT_XYZ, p.shape))
    points = np.array([[1e4, 1e4, 1e4], [-500.0, 3.0, 2.0], [8.0, 6.0, 5.0]])
    v, residual = invert.invert_points(forward, points)
    assert np.isnan(v[:2]).all() and np.isnan(residual[:2]).all()
    np.testing.assert_allclose(v[2], -SHIFT_XYZ, atol=1e-6)
    assert residual[2] < 1e-5


# ----------------------------------------------------------------------------- affine

AFFINE_GRID = Grid((20, 22, 24), (1.0, 1.0, 1.0))
AFFINE_MATRIX = rotation_zx(4.0, 2.0) @ np.diag([1.04, 0.97, 1.02])
AFFINE_CENTRE = np.array([11.5, 10.5, 9.5])
AFFINE_SHIFT = np.array([0.7, -0.4, 0.3])


def test_affine_field_matches_the_exact_affine_inverse(tmp_path):
    u, v_exact_of = affine(AFFINE_MATRIX, AFFINE_CENTRE, AFFINE_SHIFT)
    forward = write_field(tmp_path / "u.ome.zarr", AFFINE_GRID, u)
    region = whole_region(AFFINE_GRID.shape_zyx)
    v, _ = invert.invert_region(forward, AFFINE_GRID, region)
    points = AFFINE_GRID.region_points(region)
    v_exact = v_exact_of(points)
    index = preimage_index(AFFINE_GRID, points, v_exact)
    interior = within(index, AFFINE_GRID.shape_zyx, 0.5, 0.5)
    outside = ~within(index, AFFINE_GRID.shape_zyx, -1.0, -1.0)
    assert interior.sum() > 0.6 * interior.size and outside.sum() > 0
    np.testing.assert_allclose(v[:, interior], vectors_to_components(v_exact[interior]),
                               atol=1e-4)
    assert np.isnan(v[:, outside]).all()


def test_damping_inverts_a_stretch_where_plain_iteration_diverges(tmp_path):
    # moving = 2.5 x about the centre along x: |du/dx| = 1.5, so x <- y - u(x) diverges.
    u, v_exact_of = affine(np.diag([2.5, 1.0, 1.0]), AFFINE_CENTRE, np.zeros(3))
    forward = write_field(tmp_path / "u.ome.zarr", AFFINE_GRID, u)
    region = whole_region(AFFINE_GRID.shape_zyx)
    v, stats = invert.invert_region(forward, AFFINE_GRID, region)
    points = AFFINE_GRID.region_points(region)
    v_exact = v_exact_of(points)
    index = preimage_index(AFFINE_GRID, points, v_exact)
    interior = within(index, AFFINE_GRID.shape_zyx, 0.5, 0.5)
    assert interior.sum() > 0.3 * interior.size
    np.testing.assert_allclose(v[:, interior], vectors_to_components(v_exact[interior]),
                               atol=1e-4)
    assert stats["max"] < 1e-3


def test_window_reads_once_around_the_points_and_grows_when_iterates_leave_it(tmp_path):
    u, _ = affine(AFFINE_MATRIX, AFFINE_CENTRE, AFFINE_SHIFT)
    forward = write_field(tmp_path / "u.ome.zarr", AFFINE_GRID, u)
    points = AFFINE_GRID.region_points(region_from_bounds((4, 4, 4), (12, 12, 12)))
    window = invert.FieldWindow(forward)
    invert._invert_in_window(window, points.reshape(-1, 3), 50, 1e-3)
    assert window.reads == 1
    # Only around the points: well short of the whole field.
    assert np.all(window.hi - window.lo < np.array(AFFINE_GRID.shape_zyx))

    # A strong scaling moves a lone point's iterates (no spread to anticipate) about a
    # voxel from x_0: with no margin the window has to grow, and the answer is the same.
    u, v_exact_of = affine(np.diag([1.3, 1.25, 1.2]), AFFINE_CENTRE, AFFINE_SHIFT)
    forward = write_field(tmp_path / "scaled.ome.zarr", AFFINE_GRID, u)
    point = AFFINE_GRID.index_to_world(np.array([[4.0, 4.0, 4.0]]))
    tight = invert.FieldWindow(forward, margin_voxels=0)
    v, _ = invert._invert_in_window(tight, point, 50, 1e-3)
    assert tight.reads > 1
    np.testing.assert_allclose(v, v_exact_of(point), atol=1e-4)


# ----------------------------------------------------------------------------- oblique grids

FIXED_OBLIQUE = Grid((20, 24, 28), (0.5, 0.8, 1.3), (10.0, -5.0, 3.0),
                     as_direction(rotation_zx(30, -20)))
MOVING_OBLIQUE = Grid((22, 20, 26), (0.6, 0.7, 1.1), (9.0, -4.0, 2.5),
                      as_direction(rotation_zx(25, -15)))


def test_anisotropic_oblique_grids_give_the_affine_inverse(tmp_path):
    field_grid = FIXED_OBLIQUE.coarsened(2)
    lo, hi = FIXED_OBLIQUE.world_bounds()
    u, v_exact_of = affine(rotation_zx(3.0, -2.0), (lo + hi) / 2, np.array([0.9, -0.6, 0.4]))
    forward = write_field(tmp_path / "u.ome.zarr", field_grid, u, fixed_grid=FIXED_OBLIQUE,
                          chunks=8)
    grid = invert.inverse_grid(forward, MOVING_OBLIQUE)
    assert grid == MOVING_OBLIQUE.coarsened(2)
    region = whole_region(grid.shape_zyx)
    v, stats = invert.invert_region(forward, grid, region)
    points = grid.region_points(region)
    v_exact = v_exact_of(points)
    index = preimage_index(field_grid, points, v_exact)
    interior = within(index, field_grid.shape_zyx, 0.5, 0.5)
    outside = ~within(index, field_grid.shape_zyx, -1.0, -1.0)
    assert interior.sum() > 100 and outside.sum() > 100
    np.testing.assert_allclose(v[:, interior], vectors_to_components(v_exact[interior]),
                               atol=1e-4)
    assert np.isnan(v[:, outside]).all()
    assert stats["max"] < 1e-3 * min(field_grid.spacing_xyz)


# ----------------------------------------------------------------------------- synthetic truth

SYNTH_GRID = Grid((24, 28, 32), (1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    return synth.write_pair(str(out), SYNTH_GRID, seed=3, amplitude_voxels=2.0,
                            shift_voxels=(1, -1.5, 2), chunks=16, overwrite=True)


def exact_preimage(model: synth.SynthModel, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x with x + u(x) = y for the model's closed-form u (fixed-point iteration, float64),
    and whether it converged."""
    x = points - model.displacement(points)
    for _ in range(60):
        x = points - model.displacement(x)
    converged = np.linalg.norm(x + model.displacement(x) - points, axis=-1) < 1e-9
    return x, converged


def test_synth_truth_round_trips_below_a_thousandth_of_a_voxel(tmp_path, synth_pair):
    forward = field.open_field(synth_pair["truth"])
    moving_grid = ome_zarr.open_image(synth_pair["moving"]).levels[0].grid
    uri = str(tmp_path / "inverse.ome.zarr")
    inverse = invert.create_inverse(uri, forward, moving_grid, synth_pair["moving"], chunks=16)
    chunks = [invert.invert_chunk(synth_pair["truth"], uri, region)
              for region in ome_zarr.chunk_regions(moving_grid.shape_zyx, (16, 16, 16))]
    stats = invert.merge_stats(chunks)
    v = read_whole(inverse)
    points = moving_grid.region_points(whole_region(moving_grid.shape_zyx))

    # The round trip, recomputed here from what was stored.
    valid = ~np.isnan(v).any(axis=0)
    y = points[valid]
    x = y + np.moveaxis(v[:, valid], 0, -1)[..., ::-1]
    error = np.linalg.norm(x + field.sample_field(forward, x) - y, axis=-1)
    assert error.max() < 1e-3  # spacing 1: voxels
    assert stats["max"] < 1e-3 and stats["p99"] < 1e-3 and stats["rms"] < 1e-3
    assert stats["voxels"] == v[0].size and stats["nan"] == int((~valid).sum())
    assert stats["max"] == pytest.approx(error.max(), rel=1e-6)

    # Every point whose exact preimage lies well inside the fixed domain has an inverse,
    # close to the closed form's (the stored field is its trilinear interpolant).
    model = synth.make_model(SYNTH_GRID, seed=3, amplitude_voxels=2.0,
                             shift_voxels=(1, -1.5, 2))
    x_exact, converged = exact_preimage(model, points)
    interior = converged & within(SYNTH_GRID.world_to_index(x_exact), SYNTH_GRID.shape_zyx,
                                  1.0, 1.0)
    assert interior.sum() > 0.5 * interior.size
    assert valid[interior].all()
    v_exact = vectors_to_components(x_exact - points)
    assert np.abs(v[:, interior] - v_exact[:, interior]).max() < 0.1


def test_synth_chunk_stats_merge_to_the_whole_region_stats(synth_pair):
    forward = field.open_field(synth_pair["truth"])
    _, whole = invert.invert_region(forward, SYNTH_GRID, whole_region(SYNTH_GRID.shape_zyx))
    halves = [invert.invert_region(forward, SYNTH_GRID, region)[1] for region in (
        region_from_bounds((0, 0, 0), (12, 28, 32)), region_from_bounds((12, 0, 0), (24, 28, 32)))]
    merged = invert.merge_stats(halves)
    assert merged["voxels"] == whole["voxels"] and merged["nan"] == whole["nan"]
    # The iteration stops at slightly different points in different boxes: near-equal.
    assert merged["max"] == pytest.approx(whole["max"], rel=0.05)
    assert merged["rms"] == pytest.approx(whole["rms"], rel=0.05)


# ----------------------------------------------------------------------------- statistics


def test_merge_stats_equals_the_stats_of_the_union():
    rng = np.random.default_rng(7)
    errors = 10 ** rng.uniform(-7, 1, 5000)
    errors[rng.random(errors.size) < 0.1] = np.nan
    first, second = errors[:1800], errors[1800:]
    union = invert.round_trip_stats(errors)
    merged = invert.merge_stats([invert.round_trip_stats(first),
                                 invert.round_trip_stats(second)])
    assert merged["voxels"] == union["voxels"] == 5000
    assert merged["nan"] == union["nan"] == int(np.isnan(errors).sum())
    assert merged["max"] == union["max"]
    assert merged["rms"] == pytest.approx(union["rms"], rel=1e-12)
    assert merged["histogram"] == union["histogram"]
    assert sum(merged["histogram"]) == merged["voxels"] - merged["nan"]
    # p99 is the upper edge of its bin: at or above the exact value, within one bin.
    assert union["p99"] <= merged["p99"] <= union["p99"] * 10**0.1 * (1 + 1e-12)


def test_stats_of_a_region_without_any_inverse_say_so():
    stats = invert.round_trip_stats(np.full(10, np.nan))
    assert stats["voxels"] == 10 and stats["nan"] == 10
    assert stats["max"] is None and stats["rms"] is None and stats["p99"] is None
    merged = invert.merge_stats([stats, invert.round_trip_stats(np.array([0.5, 2e3]))])
    assert merged["voxels"] == 12 and merged["nan"] == 10 and merged["max"] == 2e3
    assert merged["p99"] == 2e3  # the overflow bin's edge is the maximum


# ----------------------------------------------------------------------------- chunks


def test_invert_chunk_writes_only_its_region(tmp_path):
    grid = Grid((16, 16, 16), (1.0, 1.0, 1.0))
    field_uri = str(tmp_path / "u.ome.zarr")
    forward = write_field(field_uri, grid, lambda p: np.broadcast_to(SHIFT_XYZ, p.shape))
    uri = str(tmp_path / "inverse.ome.zarr")
    inverse = invert.create_inverse(uri, forward, grid, "moving.ome.zarr", chunks=8)
    assert inverse.attributes["mapping"] == field.MOVING_TO_FIXED
    assert inverse.attributes["fixed"]["uri"] == "fixed.ome.zarr"
    assert inverse.attributes["moving"]["uri"] == "moving.ome.zarr"
    assert Grid.from_dict(inverse.attributes["moving"]) == grid
    assert inverse.levels[0].grid == grid  # factor 1: the moving grid itself

    region = region_from_bounds((8, 0, 8), (16, 8, 16))
    stats = invert.invert_chunk(field_uri, uri, [[8, 16], [0, 8], [8, 16]])
    assert stats["region"] == [[8, 16], [0, 8], [8, 16]]
    assert stats["voxels"] == 512 and stats["nan"] == 0

    stored = read_whole(field.open_field(uri, mapping=field.MOVING_TO_FIXED))
    expected, _ = invert.invert_region(forward, grid, region)
    np.testing.assert_array_equal(stored[(slice(None), *region)], expected)
    untouched = np.ones(stored.shape, dtype=bool)
    untouched[(slice(None), *region)] = False
    assert np.isnan(stored[untouched]).all()  # the fill value: no inverse known


# ----------------------------------------------------------------------------- the compiled loop


def numpy_region(forward: ome_zarr.OmeZarrImage, grid: Grid, region) -> tuple[np.ndarray, dict]:
    """`invert_region` as it was before the compiled loop: `invert_points` (the NumPy
    iteration over all points at once) and the round trip through `sample_field`."""
    y = grid.region_points(region).reshape(-1, 3)
    v, _ = invert.invert_points(forward, y)
    v = v.astype(np.float32)
    errors = np.full(len(y), np.nan)
    valid = ~np.isnan(v).any(axis=-1)
    x = y[valid] + v[valid]
    errors[valid] = np.linalg.norm(x + field.sample_field(forward, x) - y[valid], axis=-1)
    shape = tuple(s.stop - s.start for s in region)
    return vectors_to_components(v.reshape(*shape, 3)), invert.round_trip_stats(errors)


def assert_same_stats(ours: dict, theirs: dict) -> None:
    for key in ("voxels", "nan", "max", "rms", "p99", "sum_squares", "histogram"):
        assert ours[key] == theirs[key], key


def test_compiled_loop_gives_the_numpy_iterations_bits_on_axis_aligned_grids(synth_pair,
                                                                           tmp_path):
    forward = field.open_field(synth_pair["truth"])
    for region in (whole_region(SYNTH_GRID.shape_zyx),
                   region_from_bounds((0, 5, 16), (16, 28, 32))):
        v, stats = invert.invert_region(forward, SYNTH_GRID, region)
        expected, expected_stats = numpy_region(forward, SYNTH_GRID, region)
        assert stats["nan"] > 0  # the NaN rule is exercised too
        np.testing.assert_array_equal(v, expected)
        assert_same_stats(stats, expected_stats)
    # A field at spacing factor 2 (as a registration writes it), damped iterations too.
    u, _ = affine(np.diag([2.5, 1.0, 0.9]), AFFINE_CENTRE, AFFINE_SHIFT)
    coarse = AFFINE_GRID.coarsened(2)
    forward = write_field(tmp_path / "u.ome.zarr", coarse, u, fixed_grid=AFFINE_GRID, chunks=8)
    grid = invert.inverse_grid(forward, AFFINE_GRID)
    region = whole_region(grid.shape_zyx)
    v, stats = invert.invert_region(forward, grid, region)
    expected, expected_stats = numpy_region(forward, grid, region)
    np.testing.assert_array_equal(v, expected)
    assert_same_stats(stats, expected_stats)


def test_compiled_loop_on_oblique_grids_is_the_numpy_iteration_to_rounding(tmp_path):
    """Oblique directions: NumPy's matrix products may round differently in the last bit,
    so the two iterations may stop a step apart; both meet the same tolerance, and the
    round trip is no worse."""
    field_grid = FIXED_OBLIQUE.coarsened(2)
    lo, hi = FIXED_OBLIQUE.world_bounds()
    u, _ = affine(rotation_zx(3.0, -2.0), (lo + hi) / 2, np.array([0.9, -0.6, 0.4]))
    forward = write_field(tmp_path / "u.ome.zarr", field_grid, u, fixed_grid=FIXED_OBLIQUE,
                          chunks=8)
    grid = invert.inverse_grid(forward, MOVING_OBLIQUE)
    region = whole_region(grid.shape_zyx)
    v, stats = invert.invert_region(forward, grid, region)
    expected, expected_stats = numpy_region(forward, grid, region)
    np.testing.assert_array_equal(np.isnan(v), np.isnan(expected))
    spacing = min(field_grid.spacing_xyz)
    target = invert.TARGET_FRACTION * invert.TOLERANCE_VOXELS * spacing
    np.testing.assert_allclose(v, expected, rtol=0, atol=2 * target)
    assert stats["max"] <= max(expected_stats["max"], target)


def test_box_grows_when_iterates_leave_it_and_the_answer_is_the_same(tmp_path):
    # moving = half of x about the centre: the preimage of y lies |y - c| from it along x,
    # twice the largest displacement around the region: with no margin the box must grow.
    u, v_exact_of = affine(np.diag([0.5, 1.0, 1.0]), AFFINE_CENTRE, np.zeros(3))
    forward = write_field(tmp_path / "shrunk.ome.zarr", AFFINE_GRID, u)
    region = region_from_bounds((2, 2, 5), (5, 5, 8))
    tight, tight_stats = invert.invert_region(forward, AFFINE_GRID, region, margin_voxels=0)
    assert tight_stats["reruns"] >= 1 and tight_stats["field_reads"] > 1
    roomy, roomy_stats = invert.invert_region(forward, AFFINE_GRID, region)
    assert roomy_stats["reruns"] == 0
    np.testing.assert_array_equal(tight, roomy)
    assert_same_stats(tight_stats, roomy_stats)
    points = AFFINE_GRID.region_points(region)
    valid = ~np.isnan(roomy).any(axis=0)
    assert valid.sum() > 0
    np.testing.assert_allclose(roomy[:, valid], vectors_to_components(v_exact_of(points))[
        :, valid], atol=1e-4)


# ----------------------------------------------------------------------------- batches


def test_batches_balance_voxels_and_cover_every_chunk_once():
    from dreg.io.batches import balanced_batches, chunk_region

    # A 129^3 grid in 64^3 chunks: eight full chunks and 19 thin edge ones.
    shape, chunks = (129, 129, 129), (64, 64, 64)
    regions = list(ome_zarr.chunk_regions(shape, chunks))
    assert [chunk_region(shape, chunks, i) for i in range(len(regions))] == regions
    sizes = [int(np.prod([s.stop - s.start for s in r])) for r in regions]
    batches = balanced_batches(sizes, 4)
    assert sorted(i for b in batches for i in b) == list(range(len(regions)))
    assert all(b == sorted(b) for b in batches)
    totals = [sum(sizes[i] for i in b) for b in batches]
    assert max(totals) - min(totals) <= max(sizes)  # no batch waits on another's share
    assert max(totals) < 0.3 * sum(sizes)
    assert balanced_batches([5, 1], 8) == [[0], [1]]  # never an empty batch
    assert balanced_batches([], 3) == []


def test_a_large_translation_moves_the_box_it_does_not_grow_it(tmp_path):
    # Out of core: under a shift of 20 voxels along x, a chunk holds a box about its own
    # size plus the shift along x, not the shift on every side.
    grid = Grid((24, 24, 64), (1.0, 1.0, 1.0))
    shift = np.array([20.0, 0.0, 0.0])
    forward = write_field(tmp_path / "u.ome.zarr", grid, lambda p: np.broadcast_to(
        shift, p.shape))
    region = region_from_bounds((8, 8, 32), (16, 16, 40))
    v, stats = invert.invert_region(forward, grid, region)
    assert stats["nan"] == 0 and stats["reruns"] == 0 and stats["max"] < 1e-5
    np.testing.assert_allclose(v[2], -20.0, atol=1e-5)
    margin = invert.MARGIN_VOXELS
    assert stats["field_box_voxels"] <= (8 + 1 + 2 * margin) ** 2 * (8 + 1 + 20 + 2 * margin)
