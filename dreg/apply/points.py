"""Transform point sets (CSV or Parquet, millions of rows) through a displacement field.

A points file holds world coordinates in columns ``x``, ``y``, ``z`` (ITK's physical
space, the field's units) and any other columns, which are carried through untouched. The
direction is the field's: a fixed-to-moving field u moves fixed points to x + u(x), an
inverse field v (moving to fixed) moves moving points to y + v(y).

Out of core, in three steps that a flow maps over (the table reading and writing is
dreg.io.tables):

1. ``tables.check_points_file`` reads the header (and counts CSV rows by streaming);
   ``tables.batch_ranges`` cuts the rows into batches.
2. ``transform_points_batch`` per batch: reads rows [start, stop) only (a Parquet
   file's with Arrow alone, a CSV's with pandas), moves them in one compiled pass over
   the box of the field that they need, read once (tile by tile of field chunks when
   that box would exceed MAX_BOX_VOXELS), and writes the batch as its own Parquet part,
   ``<OUT>.parts/<index>.parquet``.
3. ``tables.concatenate_parts`` streams the parts, in batch order, into OUT (CSV or
   Parquet by its extension) one row group at a time, then removes the parts folder.

Points outside the field's grid (more than half a voxel beyond its first or last voxel
centre along any index axis), points with a missing coordinate, and points where the
field is NaN (an inverse without a preimage there) come out as NaN: never a silent zero
displacement. The moved coordinates have the bits of SciPy's
``map_coordinates(order=1, mode="nearest")`` of the field's float32 components, added
to the points in float64 (dreg.field.trilinear), however the points are grouped. Nothing
here imports Prefect.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dreg.errors import InputError
from dreg.field import open_field, trilinear
from dreg.grid import region_from_bounds
from dreg.io import mapped, ome_zarr, tables
from dreg.io.tables import COORDINATES

MAX_BOX_VOXELS = 1 << 22
"""Field voxels read and held at once (48 MiB of float32 vectors). A batch whose points
need no larger a box of the field is sampled in one pass over that box; a batch spread
wider is sampled tile by tile (tiles of whole field chunks), so that no process holds
more of a huge field than this, however the points are spread."""
# A point counts as inside when its index is within half a voxel of the end voxel
# centres; the tolerance keeps points exactly on that edge inside despite rounding in
# the world-to-index matrix.
EDGE_TOLERANCE_VOXELS = 1e-6


# ----------------------------------------------------------------------------- transforming


def inside_grid(field: ome_zarr.OmeZarrImage, points_xyz: np.ndarray) -> np.ndarray:
    """Which world points (N, 3) lie within the field's grid: no further than half a
    voxel beyond its first or last voxel centre along each index axis. NaN points are
    not inside."""
    grid = field.levels[0].grid
    return _inside_index(grid.world_to_index(points_xyz), grid.shape_zyx)


def _inside_index(index_zyx: np.ndarray, shape_zyx: Sequence[int]) -> np.ndarray:
    low, high = _inside_limits(shape_zyx)
    # NaN compares False, so a point with a NaN coordinate is not inside.
    return np.all((index_zyx >= low) & (index_zyx <= high), axis=-1)


def _inside_limits(shape_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    low = np.full(3, -0.5 - EDGE_TOLERANCE_VOXELS)
    high = np.asarray(shape_zyx, dtype=float) - 0.5 + EDGE_TOLERANCE_VOXELS
    return low, high


def chunk_groups(index_zyx: np.ndarray, shape_zyx: Sequence[int],
                 chunks_zyx: Sequence[int]) -> list[np.ndarray]:
    """Positions of points (continuous (z, y, x) indices, all inside the grid) grouped by
    the field chunk (or tile of chunks: any cell size) they fall in, groups in chunk
    order, positions ascending within each.

    The points of chunk c need voxels from c's first voxel to one past its last
    (trilinear weights), so a read for one group touches chunk c and its next neighbour
    along each axis: at most 8 chunks.
    """
    index = np.ascontiguousarray(index_zyx, dtype=np.float64).reshape(-1, 3)
    return _cell_groups(index, np.arange(len(index)), shape_zyx, chunks_zyx)


def _cell_groups(index: np.ndarray, rows: np.ndarray, shape_zyx: Sequence[int],
                 cell_zyx: Sequence[int]) -> list[np.ndarray]:
    """`rows` of `index` grouped by the cell they fall in (see `chunk_groups`)."""
    if len(rows) == 0:
        return []
    shape = np.asarray(shape_zyx, dtype=np.int64)
    cell = np.asarray(cell_zyx, dtype=np.int64)
    counts = np.empty(tuple(-(-shape // cell)), dtype=np.int64)
    order = trilinear.group_by_cell(index, rows.astype(np.int64), shape.astype(float),
                                    cell.astype(float), counts)
    sizes = counts.reshape(-1)
    return np.split(order, np.cumsum(sizes[sizes > 0])[:-1])


def _box(index: np.ndarray, rows: np.ndarray,
         shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The box of field voxels [lo, hi) that trilinear sampling of these rows reaches:
    from the floor of their smallest index to the floor of their largest plus one, on
    each axis, within the grid. Both neighbours of every point are inside it, also the
    upper one of a point exactly on a voxel (weight zero, but a NaN there makes the
    point NaN, as in SciPy): so the result never depends on which points share a box."""
    low, high = trilinear.rows_bounds(index, rows)
    lo = np.clip(np.floor(low).astype(np.int64), 0, shape - 1)
    hi = np.clip(np.floor(high).astype(np.int64) + 2, lo + 1, shape)
    return lo, hi


def _tile(shape: np.ndarray, chunks: np.ndarray, max_box_voxels: int) -> np.ndarray:
    """The largest tile of whole chunks, the same number along each axis, whose box (one
    voxel more than the tile along each axis, within the grid) holds at most
    `max_box_voxels` voxels; one chunk at least."""
    count = 1
    while (not np.all(count * chunks >= shape)
           and np.prod(np.minimum((count + 1) * chunks + 1, shape)) <= max_box_voxels):
        count += 1
    return count * chunks


def _transform(field: ome_zarr.OmeZarrImage, points_xyz: np.ndarray,
               max_box_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Transformed points (N, 3) and which points were inside the field's grid.

    One compiled pass over the points samples the box of the field that they need, read
    once; when that box exceeds `max_box_voxels`, the points are grouped by tile of
    field chunks and each group is sampled from its own box. Every box holds both
    neighbours of each of its points along each axis, so each point gets the bits
    SciPy's `map_coordinates(order=1, mode="nearest")` gives on the whole field.
    """
    points = np.ascontiguousarray(points_xyz, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {points.shape}")
    level = field.levels[0]
    shape = np.asarray(level.grid.shape_zyx, dtype=np.int64)
    # NumPy's world-to-index, as sample_field computes it: the same bits.
    index = np.ascontiguousarray(level.grid.world_to_index(points))
    inside = np.empty(len(points), dtype=bool)
    low, high = _inside_limits(level.grid.shape_zyx)
    count = trilinear.inside_box(index, low, high, inside)
    out = np.full(points.shape, np.nan)
    if count == 0:
        return out, inside
    rows = np.flatnonzero(inside)
    lo, hi = _box(index, rows, shape)
    if np.prod(hi - lo) <= max_box_voxels:
        groups = [rows]
    else:
        tile = _tile(shape, np.asarray(level.chunks_zyx, dtype=np.int64), max_box_voxels)
        groups = _cell_groups(index, rows, level.grid.shape_zyx, tile)
    for group in groups:
        if len(groups) > 1:
            lo, hi = _box(index, group, shape)
        data = mapped.read_region(field, 0, region_from_bounds(lo, hi))
        if data.dtype not in (np.float32, np.float64):
            data = data.astype(np.float64)
        # float32 field values, float64 sums; NaN in the field stays NaN.
        trilinear.move_rows(data, index, lo.astype(np.float64), points, group, out)
    return out, inside


def warm_up() -> None:
    """Load (or compile, the first time on a machine) this step's compiled loops on tiny
    inputs of the types a batch gives them, so that a worker's first batch does not pay
    for it (about a second)."""
    index = np.zeros((1, 3))
    rows = np.zeros(1, dtype=np.int64)
    trilinear.inside_box(index, np.zeros(3), np.ones(3), np.empty(1, dtype=bool))
    trilinear.rows_bounds(index, rows)
    trilinear.group_by_cell(index, rows, np.ones(3), np.ones(3),
                            np.empty((1, 1, 1), dtype=np.int64))
    for dtype in (np.float32, np.float64):
        trilinear.move_rows(np.zeros((3, 1, 1, 1), dtype), index, np.zeros(3), index, rows,
                            np.empty((1, 3)))


def transform_xyz(field: ome_zarr.OmeZarrImage, points_xyz: np.ndarray,
                  max_box_voxels: int = MAX_BOX_VOXELS) -> np.ndarray:
    """World points (N, 3) in (x, y, z) order moved through the field: p + field(p),
    float64.

    The field is read once, over the box the points need, when that box holds at most
    `max_box_voxels` voxels; else tile by tile of field chunks (each read touching only
    the chunks around its points). NaN for points outside the field's grid, for NaN
    coordinates, and where the field is NaN.
    """
    return _transform(field, points_xyz, max_box_voxels)[0]


def _numbers(column: pd.Series, name: str, source: str) -> np.ndarray:
    """A coordinate column as float64; missing values are NaN, text an InputError."""
    try:
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    except (ValueError, TypeError):
        numbers = pd.to_numeric(column, errors="coerce")
        bad = column[numbers.isna() & column.notna()]
        example = f" (row {bad.index[0]}: {bad.iloc[0]!r})" if len(bad) else ""
        raise InputError(f"{source}: column {name} holds values that are not "
                         f"numbers{example}") from None


def _coordinates(frame: pd.DataFrame, source: str) -> np.ndarray:
    """The frame's x, y, z as float64 (N, 3); missing values are NaN."""
    return np.stack([_numbers(frame[name], name, source) for name in COORDINATES], axis=1)


def _table_coordinates(table: pa.Table, source: str) -> np.ndarray:
    """An Arrow table's x, y, z as float64 (N, 3); missing values are NaN.

    Integers and floats are converted by Arrow (a C cast, as NumPy's: the values pandas
    gives); any other type (decimals) through pandas, as the frame path converts it.
    """
    points = np.empty((table.num_rows, 3))
    for axis, name in enumerate(COORDINATES):
        column = table.column(name)
        kind = column.type
        if pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind):
            # safe=False: integers beyond 2**53 round, as NumPy's conversion rounds them.
            points[:, axis] = column.cast(pa.float64(), safe=False).to_numpy()
        else:
            points[:, axis] = _numbers(column.to_pandas(), name, source)
    return points


def transform_batch(field: ome_zarr.OmeZarrImage, frame: pd.DataFrame,
                    source: str = "points",
                    max_box_voxels: int = MAX_BOX_VOXELS) -> tuple[pd.DataFrame, int]:
    """A batch of points with x, y, z replaced by their transformed values (float64),
    and the number of points with coordinates that lie outside the field's grid.

    Every other column, the column order and the row order are kept. `source` names the
    input in error messages.
    """
    points = _coordinates(frame, source)
    moved, inside = _transform(field, points, max_box_voxels)
    outside = int(np.count_nonzero(~inside & np.all(np.isfinite(points), axis=1)))
    out = frame.copy()
    for axis, name in enumerate(COORDINATES):
        out[name] = moved[:, axis]
    return out, outside


def transform_table(field: ome_zarr.OmeZarrImage, table: pa.Table, source: str = "points",
                    max_box_voxels: int = MAX_BOX_VOXELS) -> tuple[pa.Table, int]:
    """`transform_batch` for an Arrow table, without pandas: x, y, z replaced by their
    transformed values (float64, null where there is none: what pandas' NaN become when
    a frame is written), every other column untouched (same values, types and order).
    Returns the table and the number of points outside the field's grid."""
    points = _table_coordinates(table, source)
    moved, inside = _transform(field, points, max_box_voxels)
    outside = int(np.count_nonzero(~inside & np.all(np.isfinite(points), axis=1)))
    for axis, name in enumerate(COORDINATES):
        position = table.schema.get_field_index(name)
        values = pa.array(moved[:, axis], type=pa.float64(), from_pandas=True)
        table = table.set_column(position, pa.field(name, pa.float64()), values)
    return table, outside


def _unmapped(table: pa.Table) -> int:
    """Rows of a transformed table without a result: any of x, y, z null."""
    missing = functools.reduce(pc.or_, [table.column(n).is_null() for n in COORDINATES])
    return int(pc.sum(missing).as_py() or 0)


def transform_points_batch(field_uri: str, mapping: str, points_uri: str, start: int,
                           stop: int, part_uri: str) -> dict:
    """Transform rows [start, stop) of a points file through a field and write them as a
    part. `mapping` is the field's direction (fixed_to_moving or moving_to_fixed), checked
    against the field's metadata.

    A Parquet file's rows go through Arrow alone (read, transformed, written: its other
    columns are never converted); a CSV's through pandas, whose parser infers its types.

    Returns {"rows": rows written, "outside": points outside the field's grid,
    "unmapped": points without a result (NaN), whatever the reason}.
    """
    field = open_field(field_uri, mapping=mapping)
    points = tables.open_points_file(points_uri, count_rows=False)
    if points.format == tables.PARQUET:
        table = tables.read_batch_table(points, start, stop)
        moved, outside = transform_table(field, table, source=points.uri)
        tables.write_part_table(moved, part_uri, schema=tables.part_schema(points))
        unmapped = _unmapped(moved)
        return {"rows": moved.num_rows, "outside": outside, "unmapped": unmapped}
    frame = tables.read_batch(points, start, stop)
    moved, outside = transform_batch(field, frame, source=points.uri)
    tables.write_part(moved, part_uri, schema=tables.part_schema(points))
    unmapped = int(moved[list(COORDINATES)].isna().any(axis=1).sum())
    return {"rows": len(moved), "outside": outside, "unmapped": unmapped}
