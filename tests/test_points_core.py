"""Transforming point sets through displacement fields: dreg.apply.points and the
tables it reads and writes (dreg.io.tables), on real CSV and Parquet files and real zarr
fields."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import ndimage

from dreg import synth
from dreg.apply.points import (
    chunk_groups,
    transform_batch,
    transform_points_batch,
    transform_xyz,
)
from dreg.errors import InputError, StorageError
from dreg.field import (
    FIXED_TO_MOVING,
    MOVING_TO_FIXED,
    create_field,
    open_field,
    sample_field,
)
from dreg.grid import Grid, region_shape, vectors_to_components
from dreg.io import ome_zarr, storage
from dreg.io.tables import (
    batch_ranges,
    check_points_file,
    concatenate_parts,
    part_uri,
    parts_folder,
    parts_share_schema,
    read_batch,
)

TRANSLATION = (1.5, -2.25, 0.75)  # exact in float32


def rotation(axis, angle: float) -> tuple[tuple[float, ...], ...]:
    """A rotation matrix (Rodrigues) about `axis` by `angle` radians."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    matrix = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    return tuple(tuple(row) for row in matrix)


ROTATED = Grid((20, 24, 28), (0.5, 0.8, 2.0), (10.0, -5.0, 3.0), rotation((1, 2, 3), 0.6))
PLAIN = Grid((24, 24, 24), (1.0, 1.0, 1.0))


def write_constant_field(uri, grid: Grid, vector_xyz, chunks: int = 16,
                         mapping: str = FIXED_TO_MOVING):
    image = create_field(str(uri), grid, chunks=chunks, overwrite=True, mapping=mapping)
    components = vectors_to_components(np.asarray(vector_xyz, dtype=float))
    ome_zarr.write_level_by_chunks(
        image, 0,
        lambda region: np.broadcast_to(components[:, None, None, None],
                                       (3, *region_shape(region))).astype(np.float32),
        workers=1,
    )
    return open_field(str(uri), mapping)


def points_inside(grid: Grid, count: int, rng, lo=None, hi=None) -> np.ndarray:
    """World points at uniform continuous indices in [lo, hi] (default: the whole grid,
    to half a voxel beyond the end centres)."""
    shape = np.asarray(grid.shape_zyx, dtype=float)
    lo = np.full(3, -0.5) if lo is None else np.asarray(lo, dtype=float)
    hi = shape - 0.5 if hi is None else np.asarray(hi, dtype=float)
    return grid.index_to_world(rng.uniform(lo, hi, size=(count, 3)))


def table_of_points(points_xyz: np.ndarray, rng) -> pd.DataFrame:
    """Points with extra columns (int, text with CSV specials, float), coordinates among
    them rather than first."""
    n = len(points_xyz)
    names = np.array(["alpha", "b,c", 'say "hi"', "line\nbreak", "", "NA-free"], dtype=object)
    return pd.DataFrame({
        "cell": np.arange(1000, 1000 + n, dtype=np.int64),
        "x": points_xyz[:, 0],
        "name": [f"{names[i % len(names)]}{i}" for i in range(n)],
        "y": points_xyz[:, 1],
        "z": points_xyz[:, 2],
        "score": rng.normal(size=n),
    })


def write_table(frame: pd.DataFrame, path: Path, row_group_size: int = 7) -> str:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False, row_group_size=row_group_size)
    return str(path)


def read_table(path: Path | str) -> pd.DataFrame:
    path = str(path)
    return pd.read_csv(path) if path.endswith(".csv") else pd.read_parquet(path)


def run_points(field_uri: str, mapping: str, points_uri: str, out_uri: str,
               batch_rows: int) -> tuple[list[dict], int]:
    """What the points flow does: check, one batch per task, concatenate."""
    points = check_points_file(points_uri)
    ranges = batch_ranges(points.rows, batch_rows)
    parts = [part_uri(out_uri, index) for index in range(len(ranges))]
    results = [transform_points_batch(field_uri, mapping, points_uri, start, stop, part)
               for (start, stop), part in zip(ranges, parts, strict=True)]
    return results, concatenate_parts(parts, out_uri)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("grid", [PLAIN, ROTATED], ids=["plain", "anisotropic-rotated"])
def test_constant_translation_moves_points_by_that_vector(tmp_path, grid):
    field = write_constant_field(tmp_path / "u.ome.zarr", grid, TRANSLATION)
    points = points_inside(grid, 500, np.random.default_rng(1))
    moved = transform_xyz(field, points)
    assert moved.dtype == np.float64
    np.testing.assert_allclose(moved, points + np.asarray(TRANSLATION), rtol=0, atol=1e-9)


def test_matches_the_synthetic_truth_at_interior_points(tmp_path):
    grid = Grid((24, 28, 32), (1.0, 1.5, 2.0), (3.0, -4.0, 1.0), rotation((0, 1, 1), 0.3))
    pair = synth.write_pair(str(tmp_path / "pair"), grid, seed=0, amplitude_voxels=2.0,
                            chunks=16, overwrite=True)
    model = synth.make_model(grid, seed=0, amplitude_voxels=2.0)
    field = open_field(pair["truth"])
    points = points_inside(grid, 2000, np.random.default_rng(2), lo=(1, 1, 1),
                           hi=np.asarray(grid.shape_zyx) - 2.0)
    moved = transform_xyz(field, points, max_box_voxels=9 ** 3)
    expected = points + model.displacement(points)
    # Trilinear interpolation of waves at least half the extent long, amplitude 2
    # voxels: errors of a few hundredths of the finest spacing.
    assert np.max(np.abs(moved - expected)) < 0.05 * min(grid.spacing_xyz)


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("out_ext", [".csv", ".parquet"])
@pytest.mark.parametrize("in_ext", [".csv", ".parquet", ".pq"])
def test_rows_order_and_extra_columns_are_kept(tmp_path, in_ext, out_ext):
    rng = np.random.default_rng(3)
    field = write_constant_field(tmp_path / "u.ome.zarr", ROTATED, TRANSLATION, chunks=8)
    points = points_inside(ROTATED, 53, rng)
    points[[4, 40]] += 1000.0  # far outside the field
    frame = table_of_points(points, rng)
    points_uri = write_table(frame, tmp_path / f"points{in_ext}", row_group_size=7)
    out_uri = str(tmp_path / f"moved{out_ext}")

    # Batches of 10 rows cut through the 7-row row groups of the Parquet inputs.
    results, rows = run_points(field.uri, FIXED_TO_MOVING, points_uri, out_uri, batch_rows=10)

    assert rows == 53 and [r["rows"] for r in results] == [10] * 5 + [3]
    assert sum(r["outside"] for r in results) == 2
    expected = read_table(points_uri)
    moved = transform_xyz(field, points)
    expected[["x", "y", "z"]] = moved
    pd.testing.assert_frame_equal(read_table(out_uri), expected, check_exact=True)
    assert not os.path.exists(parts_folder(out_uri))


def test_parquet_output_keeps_the_input_schema_and_pandas_index(tmp_path):
    field = write_constant_field(tmp_path / "u.ome.zarr", PLAIN, TRANSLATION)
    points = points_inside(PLAIN, 9, np.random.default_rng(4)).astype(np.float32)
    frame = pd.DataFrame(
        {"x": points[:, 0], "y": points[:, 1], "z": points[:, 2],
         "count": pd.array([1, None, 3, 4, None, 6, 7, 8, 9], dtype="Int64")},
        index=pd.Index(np.arange(9) * 10, name="cell"),
    )
    frame.to_parquet(tmp_path / "in.parquet", row_group_size=4)

    run_points(field.uri, FIXED_TO_MOVING, str(tmp_path / "in.parquet"),
               str(tmp_path / "out.parquet"), batch_rows=3)

    out = pd.read_parquet(tmp_path / "out.parquet")
    expected = frame.astype({"x": "float64", "y": "float64", "z": "float64"})
    expected[["x", "y", "z"]] = transform_xyz(field, points.astype(float))
    pd.testing.assert_frame_equal(out, expected)
    schema = pq.read_schema(tmp_path / "out.parquet")
    assert str(schema.field("count").type) == "int64"


def test_read_batch_reads_rows_across_parquet_row_groups(tmp_path):
    rng = np.random.default_rng(5)
    frame = table_of_points(points_inside(PLAIN, 40, rng), rng)
    uri = write_table(frame, tmp_path / "points.parquet", row_group_size=7)
    points = check_points_file(uri)
    assert (points.format, points.rows, points.columns) == ("parquet", 40, tuple(frame.columns))
    for start, stop in [(0, 7), (5, 31), (13, 14), (35, 40), (38, 99), (40, 40)]:
        batch = read_batch(points, start, stop)
        pd.testing.assert_frame_equal(batch, frame.iloc[start:stop], check_exact=True)


def test_csv_batches_count_quoted_newlines_and_blank_lines_consistently(tmp_path):
    path = tmp_path / "points.csv"
    path.write_text('x,y,z,note\n1,1,1,a\n2,2,2,"two\nlines"\n\n3,3,3,c\n4,4,4,"d,e"\n'
                    '5,5,5,f\n\n\n')
    points = check_points_file(str(path))
    # The blank line inside stays a row (of NaN), so that row numbers do not shift;
    # the blank lines at the end are not rows.
    assert points.rows == 6
    whole = pd.concat([read_batch(points, a, b) for a, b in batch_ranges(points.rows, 2)])
    assert whole["note"].tolist()[:2] == ["a", "two\nlines"]
    assert np.isnan(whole["x"].iloc[2])
    assert whole["x"].tolist()[3:] == [3, 4, 5]
    assert whole["note"].tolist()[3:] == ["c", "d,e", "f"]
    assert whole.index.tolist() == list(range(6))


def test_empty_points_file_gives_an_empty_output_with_the_columns(tmp_path):
    field = write_constant_field(tmp_path / "u.ome.zarr", PLAIN, TRANSLATION)
    (tmp_path / "empty.csv").write_text("id,x,y,z\n")
    for out in ("out.csv", "out.parquet"):
        results, rows = run_points(field.uri, FIXED_TO_MOVING, str(tmp_path / "empty.csv"),
                                   str(tmp_path / out), batch_rows=10)
        assert rows == 0 and results == [{"rows": 0, "outside": 0, "unmapped": 0}]
        assert list(read_table(tmp_path / out).columns) == ["id", "x", "y", "z"]


# ----------------------------------------------------------------------------- outside, NaN


def test_points_outside_the_field_are_nan_and_counted(tmp_path):
    grid = Grid((10, 12, 14), (1.0, 2.0, 3.0), (5.0, 5.0, 5.0))
    field = write_constant_field(tmp_path / "u.ome.zarr", grid, TRANSLATION, chunks=4)
    index = np.array([
        [-0.5, 0, 0],            # on the edge: inside
        [9.5, 11.5, 13.5],       # on the far edge: inside
        [4, 5, 6],               # inside
        [-0.51, 3, 3],           # just beyond half a voxel: outside
        [3, 3, 13.52],           # outside along x only
        [100, 100, 100],         # far away
    ])
    points = np.vstack([grid.index_to_world(index), [[np.nan, 7.0, 7.0]]])
    frame = pd.DataFrame({"x": points[:, 0], "y": points[:, 1], "z": points[:, 2],
                          "tag": list("abcdefg")})

    moved, outside = transform_batch(field, frame)

    assert outside == 3  # the NaN coordinate is missing, not outside
    result = moved[["x", "y", "z"]].to_numpy()
    np.testing.assert_allclose(result[:3], points[:3] + TRANSLATION, atol=1e-9)
    assert np.isnan(result[3:]).all()
    assert moved["tag"].tolist() == list("abcdefg")


def test_inverse_field_without_preimage_gives_nan(tmp_path):
    uri = tmp_path / "v.ome.zarr"
    field = write_constant_field(uri, PLAIN, TRANSLATION, mapping=MOVING_TO_FIXED)
    nan_box = (slice(0, 6), slice(0, 6), slice(0, 6))
    ome_zarr.write_region(field, 0, nan_box, np.full((3, 6, 6, 6), np.nan, np.float32))
    points = PLAIN.index_to_world(np.array([[1.0, 1, 1], [5.5, 2, 2], [12, 12, 12]]))
    frame = pd.DataFrame({"x": points[:, 0], "y": points[:, 1], "z": points[:, 2]})
    frame.to_parquet(tmp_path / "p.parquet", index=False)

    with pytest.raises(InputError, match="mapping must be fixed_to_moving"):
        transform_points_batch(str(uri), FIXED_TO_MOVING, str(tmp_path / "p.parquet"), 0, 3,
                               part_uri(str(tmp_path / "o.csv"), 0))
    result = transform_points_batch(str(uri), MOVING_TO_FIXED, str(tmp_path / "p.parquet"),
                                    0, 3, part_uri(str(tmp_path / "o.csv"), 0))
    concatenate_parts([part_uri(str(tmp_path / "o.csv"), 0)], str(tmp_path / "o.csv"))

    assert result == {"rows": 3, "outside": 0, "unmapped": 2}
    out = pd.read_csv(tmp_path / "o.csv")[["x", "y", "z"]].to_numpy()
    # The second point's trilinear neighbours include the last NaN voxel (index 5).
    assert np.isnan(out[:2]).all()
    np.testing.assert_allclose(out[2], points[2] + TRANSLATION, atol=1e-9)


# ----------------------------------------------------------------------------- input errors


def test_points_without_coordinates_name_the_missing_columns(tmp_path):
    (tmp_path / "a.csv").write_text("id,x,b\n1,2,3\n")
    with pytest.raises(InputError, match=r"a\.csv: missing column\(s\) y, z"):
        check_points_file(str(tmp_path / "a.csv"))
    pd.DataFrame({"x": [1.0], "y": [2.0]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet: missing column\(s\) z \("):
        check_points_file(str(tmp_path / "b.parquet"))


def test_unreadable_points_files_are_input_errors_naming_them(tmp_path):
    (tmp_path / "points.txt").write_text("x,y,z\n")
    with pytest.raises(InputError, match=r"points\.txt: unknown points file extension"):
        check_points_file(str(tmp_path / "points.txt"))
    with pytest.raises(InputError, match=r"nothere\.csv: no such points file"):
        check_points_file(str(tmp_path / "nothere.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match=r"empty\.csv: empty CSV file"):
        check_points_file(str(tmp_path / "empty.csv"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"broken\.parquet: not a readable PARQUET"):
        check_points_file(str(tmp_path / "broken.parquet"))
    with pytest.raises(InputError, match=r"out\.json: unknown points file extension"):
        concatenate_parts([str(tmp_path / "p.parquet")], str(tmp_path / "out.json"))


def test_non_numeric_coordinates_name_the_column(tmp_path):
    field = write_constant_field(tmp_path / "u.ome.zarr", PLAIN, TRANSLATION)
    (tmp_path / "p.csv").write_text("x,y,z\n1,2,3\n4,five,6\n")
    with pytest.raises(InputError, match=r"p\.csv: column y holds values that are not "
                                         r"numbers \(row 1: 'five'\)"):
        transform_points_batch(field.uri, FIXED_TO_MOVING, str(tmp_path / "p.csv"), 0, 2,
                               str(tmp_path / "part.parquet"))


# ----------------------------------------------------------------------------- reads


def chunks_of_box(index_zyx: np.ndarray, shape, chunks) -> list[range]:
    """The chunk ranges, per axis, of the box sample_field reads for these points."""
    shape, chunks = np.asarray(shape), np.asarray(chunks)
    lo = np.clip(np.floor(index_zyx.min(axis=0)).astype(int), 0, shape - 1)
    hi = np.clip(np.ceil(index_zyx.max(axis=0)).astype(int) + 1, lo + 1, shape)
    return [range(a // c, (b - 1) // c + 1) for a, b, c in zip(lo, hi, chunks, strict=True)]


def smooth_field(uri, grid: Grid, chunks: int):
    image = create_field(str(uri), grid, chunks=chunks, overwrite=True)

    def values(region):
        world = grid.region_points(region)
        u = np.stack([np.sin(world[..., 0] / 7), np.cos(world[..., 1] / 5),
                      np.sin(world[..., 2] / 3)], axis=-1)
        return vectors_to_components(u).astype(np.float32)

    ome_zarr.write_level_by_chunks(image, 0, values, workers=1)
    return open_field(str(uri))


def test_grouped_reads_touch_only_the_chunks_around_each_group(tmp_path):
    grid = Grid((64, 64, 64), (1.0, 1.0, 1.0))
    field = smooth_field(tmp_path / "u.ome.zarr", grid, chunks=8)
    # Points over 27 chunks (chunk indices 2..4 on each axis) of the 512.
    points = points_inside(grid, 3000, np.random.default_rng(6), lo=(16, 16, 16),
                           hi=(39.99, 39.99, 39.99))
    expected = points + sample_field(field, points)

    # A box budget of one chunk (and its next voxel) per axis: one read per chunk group.
    one_chunk = 9 ** 3
    np.testing.assert_allclose(transform_xyz(field, points, max_box_voxels=one_chunk),
                               expected, rtol=0, atol=1e-6)

    index = grid.world_to_index(points)
    groups = chunk_groups(index, grid.shape_zyx, field.levels[0].chunks_zyx)
    assert len(groups) == 27 and sorted(np.concatenate(groups)) == list(range(3000))
    needed = set()
    for group in groups:
        box = chunks_of_box(index[group], grid.shape_zyx, field.levels[0].chunks_zyx)
        touched = {(z, y, x) for z in box[0] for y in box[1] for x in box[2]}
        assert len(touched) <= 8
        needed |= touched

    # Break every chunk no group needs: the grouped transform still works, while one
    # read of the points' whole box fails.
    chunk_files = Path(field.uri, "0", "c", "0")
    for path in chunk_files.glob("*/*/*"):
        if tuple(int(p) for p in path.relative_to(chunk_files).parts) not in needed:
            path.write_bytes(b"broken")
    assert len(needed) == 4 * 4 * 4  # chunks 2..5 on each axis, of 512
    np.testing.assert_allclose(transform_xyz(field, points, max_box_voxels=one_chunk),
                               expected, rtol=0, atol=1e-6)
    # The points' whole box is those same chunks: read at once within the default budget.
    np.testing.assert_allclose(transform_xyz(field, points), expected, rtol=0, atol=1e-6)
    wide = np.vstack([points, grid.index_to_world(np.array([[60.0, 60, 60]]))])
    with pytest.raises(StorageError):
        sample_field(field, wide)


def moved_per_chunk_group(field, points: np.ndarray) -> np.ndarray:
    """How points were moved before the compiled pass (the reference): grouped by field
    chunk with NumPy's stable argsort, each group sampled by sample_field on its own."""
    level = field.levels[0]
    shape, chunks = np.asarray(level.grid.shape_zyx), np.asarray(level.chunks_zyx)
    index = level.grid.world_to_index(points)
    inside = np.all((index >= -0.5 - 1e-6) & (index <= shape - 0.5 + 1e-6), axis=1)
    rows = np.flatnonzero(inside)
    cell = (np.clip(index[rows], 0, shape - 1) // chunks).astype(np.int64)
    key = np.ravel_multi_index(tuple(cell.T), tuple(-(-shape // chunks)))
    order = np.argsort(key, kind="stable")
    out = np.full(points.shape, np.nan)
    for group in np.split(order, np.flatnonzero(np.diff(key[order])) + 1):
        selected = rows[group]
        out[selected] = points[selected] + sample_field(field, points[selected])
    return out


@pytest.mark.parametrize("grid", [PLAIN, ROTATED], ids=["plain", "anisotropic-rotated"])
def test_one_pass_and_tiles_give_the_bits_of_per_chunk_sampling(tmp_path, grid):
    field = smooth_field(tmp_path / "u.ome.zarr", grid, chunks=8)
    rng = np.random.default_rng(9)
    points = points_inside(grid, 4000, rng, lo=(-0.6, -0.6, -0.6),
                           hi=np.asarray(grid.shape_zyx) - 0.4)
    # Points on voxel centres and on the grid's edges, and a missing coordinate.
    on_grid = grid.index_to_world(rng.integers(0, 8, size=(50, 3)).astype(float))
    points = np.vstack([points, on_grid, [[np.nan, 1.0, 1.0]]])
    expected = moved_per_chunk_group(field, points)
    assert np.isnan(expected).any() and not np.isnan(expected).all()

    # The points' box in one read, tiles of one chunk, tiles of two chunks.
    for budget in (10 ** 9, 9 ** 3, 17 ** 3):
        np.testing.assert_array_equal(transform_xyz(field, points, max_box_voxels=budget),
                                      expected)


def test_a_point_on_a_voxel_next_to_nan_is_nan_however_it_is_grouped(tmp_path):
    """SciPy weighs both neighbours along each axis, the upper one with weight zero for
    a point exactly on a voxel: a NaN there makes the point NaN. The box read for a
    point always holds that neighbour, so the result does not depend on which points
    share the box (before, a point alone in its chunk's box came out finite)."""
    field = write_constant_field(tmp_path / "v.ome.zarr", PLAIN, TRANSLATION,
                                 mapping=MOVING_TO_FIXED)
    ome_zarr.write_region(field, 0, (slice(0, 24), slice(0, 24), slice(13, 14)),
                          np.full((3, 24, 24, 1), np.nan, np.float32))
    on_voxel = PLAIN.index_to_world(np.array([[5.0, 5.0, 12.0]]))
    data = ome_zarr.read_region(field, 0, (slice(0, 24),) * 3)
    index = PLAIN.world_to_index(on_voxel).T
    whole = np.stack([ndimage.map_coordinates(data[c], index, order=1, mode="nearest")
                      for c in (2, 1, 0)], axis=1)
    assert np.isnan(whole).all()
    others = points_inside(PLAIN, 200, np.random.default_rng(11))
    for points in (on_voxel, np.vstack([others, on_voxel])):
        for budget in (10 ** 9, 9 ** 3):
            moved = transform_xyz(field, points, max_box_voxels=budget)
            assert np.isnan(moved[-1]).all()


def test_chunk_groups_are_a_stable_sort_by_chunk():
    rng = np.random.default_rng(10)
    shape, chunks = (20, 24, 28), (8, 8, 8)
    index = rng.uniform(-0.5, np.asarray(shape) - 0.5, size=(3000, 3))
    cell = (np.clip(index, 0, np.asarray(shape) - 1) // chunks).astype(np.int64)
    key = np.ravel_multi_index(tuple(cell.T), (3, 3, 4))
    order = np.argsort(key, kind="stable")
    expected = np.split(order, np.flatnonzero(np.diff(key[order])) + 1)
    groups = chunk_groups(index, shape, chunks)
    assert len(groups) == len(expected) == 36
    for group, reference in zip(groups, expected, strict=True):
        np.testing.assert_array_equal(group, reference)
    assert chunk_groups(np.empty((0, 3)), shape, chunks) == []


# ----------------------------------------------------------------------------- parts


def test_batch_ranges_cover_the_rows_in_order():
    assert batch_ranges(0, 10) == [(0, 0)]
    assert batch_ranges(10, 5) == [(0, 5), (5, 10)]
    assert batch_ranges(11, 5) == [(0, 5), (5, 10), (10, 11)]
    assert batch_ranges(3, 1_000_000) == [(0, 3)]
    with pytest.raises(ValueError):
        batch_ranges(5, 0)


def test_part_names_sort_in_batch_order(tmp_path):
    out = str(tmp_path / "out.parquet")
    names = [part_uri(out, i) for i in (0, 2, 10, 123)]
    assert names == sorted(names)
    assert names[2] == str(tmp_path / "out.parquet.parts" / "000010.parquet")


def test_concatenation_unifies_types_that_batches_inferred_differently(tmp_path):
    field = write_constant_field(tmp_path / "u.ome.zarr", PLAIN, TRANSLATION)
    # Batches of 3: 'count' is int in the first, float (a blank) in the second; 'code'
    # is numeric in the first and text in the second.
    (tmp_path / "p.csv").write_text("x,y,z,count,code\n"
                                    "1,1,1,1,10\n2,2,2,2,11\n3,3,3,3,12\n"
                                    "4,4,4,,ab\n5,5,5,5,cd\n6,6,6,6,7\n")
    run_points(field.uri, FIXED_TO_MOVING, str(tmp_path / "p.csv"),
               str(tmp_path / "out.parquet"), batch_rows=3)
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["count"].dtype == np.float64
    np.testing.assert_array_equal(out["count"], [1, 2, 3, np.nan, 5, 6])
    assert out["code"].tolist() == ["10", "11", "12", "ab", "cd", "7"]
    np.testing.assert_allclose(out["x"], np.arange(1, 7) + TRANSLATION[0])


def test_concatenation_streams_many_parts_in_order(tmp_path):
    rng = np.random.default_rng(7)
    field = write_constant_field(tmp_path / "u.ome.zarr", ROTATED, TRANSLATION, chunks=8)
    frame = table_of_points(points_inside(ROTATED, 1000, rng), rng)
    uri = write_table(frame, tmp_path / "points.parquet", row_group_size=64)
    out = str(tmp_path / "moved.parquet")
    # A stale part of an earlier attempt is removed with the rest.
    Path(parts_folder(out)).mkdir()
    Path(parts_folder(out), "999999.parquet").write_bytes(b"stale")

    results, rows = run_points(field.uri, FIXED_TO_MOVING, uri, out, batch_rows=37)

    assert rows == 1000 and len(results) == 28
    moved = pd.read_parquet(out)
    assert moved["cell"].tolist() == frame["cell"].tolist()
    np.testing.assert_allclose(moved[["x", "y", "z"]],
                               frame[["x", "y", "z"]].to_numpy() + TRANSLATION, atol=1e-9)
    assert not os.path.exists(parts_folder(out))
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize("out_ext", [".csv", ".parquet"])
def test_parts_of_a_parquet_input_are_appended_as_they_come(tmp_path, out_ext):
    """What the points flow does for a Parquet input: each part is appended as soon as
    it is written (here: written only when the concatenation asks for the next one),
    and the output is the one concatenating all the parts at the end gives."""
    rng = np.random.default_rng(12)
    field = write_constant_field(tmp_path / "u.ome.zarr", ROTATED, TRANSLATION, chunks=8)
    frame = table_of_points(points_inside(ROTATED, 100, rng), rng)
    uri = write_table(frame, tmp_path / "points.parquet", row_group_size=16)
    points = check_points_file(uri)
    assert parts_share_schema(points)
    ranges = batch_ranges(points.rows, 30)
    at_end = str(tmp_path / f"at-end{out_ext}")
    run_points(field.uri, FIXED_TO_MOVING, uri, at_end, batch_rows=30)

    streamed = str(tmp_path / f"streamed{out_ext}")
    written = []

    def parts_as_they_come():
        for index, (start, stop) in enumerate(ranges):
            part = part_uri(streamed, index)
            assert not os.path.exists(part)
            transform_points_batch(field.uri, FIXED_TO_MOVING, uri, start, stop, part)
            written.append(index)
            yield part

    rows = concatenate_parts(parts_as_they_come(), streamed, same_schema=True)

    assert rows == 100 and written == [0, 1, 2, 3]
    assert Path(streamed).read_bytes() == Path(at_end).read_bytes()
    assert not os.path.exists(parts_folder(streamed))


def test_parts_of_a_csv_input_do_not_share_a_schema(tmp_path):
    (tmp_path / "p.csv").write_text("x,y,z\n1,2,3\n")
    assert not parts_share_schema(check_points_file(str(tmp_path / "p.csv")))


# ----------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_points_on_s3(s3, tmp_path):
    field = write_constant_field(tmp_path / "u.ome.zarr", PLAIN, TRANSLATION)
    rng = np.random.default_rng(8)
    frame = table_of_points(points_inside(PLAIN, 25, rng), rng)
    prefix = s3.uri(uuid.uuid4().hex)
    storage.write_bytes(f"{prefix}/points.csv", frame.to_csv(index=False).encode())
    out = f"{prefix}/moved.parquet"
    results, rows = run_points(field.uri, FIXED_TO_MOVING, f"{prefix}/points.csv", out,
                               batch_rows=10)
    assert rows == 25 and [r["rows"] for r in results] == [10, 10, 5]
    fs, path = storage.filesystem(out)
    with fs.open(path, "rb") as handle:
        moved = pd.read_parquet(handle)
    assert moved["name"].tolist() == frame["name"].tolist()
    np.testing.assert_allclose(moved[["x", "y", "z"]],
                               frame[["x", "y", "z"]].to_numpy() + TRANSLATION, atol=1e-9)
    assert not storage.exists(parts_folder(out))
