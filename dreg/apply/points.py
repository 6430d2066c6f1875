"""Transform point sets (CSV or Parquet, millions of rows) through a displacement field.

A points file holds world coordinates in columns ``x``, ``y``, ``z`` (ITK's physical
space, the field's units) and any other columns, which are carried through untouched. The
direction is the field's: a fixed-to-moving field u moves fixed points to x + u(x), an
inverse field v (moving to fixed) moves moving points to y + v(y).

Out of core, in three steps that a flow maps over (the table reading and writing is
dreg.io.tables):

1. ``tables.check_points_file`` reads the header (and counts CSV rows by streaming);
   ``tables.batch_ranges`` cuts the rows into batches.
2. ``transform_points_batch`` per batch: reads rows [start, stop) only, transforms them
   with reads of the field grouped by field chunk (each read touches at most 8 chunks),
   and writes the batch as its own Parquet part, ``<OUT>.parts/<index>.parquet``.
3. ``tables.concatenate_parts`` streams the parts, in batch order, into OUT (CSV or
   Parquet by its extension) one row group at a time, then removes the parts folder.

Points outside the field's grid (more than half a voxel beyond its first or last voxel
centre along any index axis), points with a missing coordinate, and points where the
field is NaN (an inverse without a preimage there) come out as NaN: never a silent zero
displacement. Nothing here imports Prefect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dreg.errors import InputError
from dreg.field import open_field, sample_field
from dreg.io import ome_zarr, tables
from dreg.io.tables import COORDINATES

MAX_POINTS_PER_READ = 1 << 18
"""Points sampled at once: bounds sample_field's temporaries (a few tens of MB)."""
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
    low = -0.5 - EDGE_TOLERANCE_VOXELS
    high = np.asarray(shape_zyx, dtype=float) - 0.5 + EDGE_TOLERANCE_VOXELS
    # NaN compares False, so a point with a NaN coordinate is not inside.
    return np.all((index_zyx >= low) & (index_zyx <= high), axis=-1)


def chunk_groups(index_zyx: np.ndarray, shape_zyx: Sequence[int],
                 chunks_zyx: Sequence[int]) -> list[np.ndarray]:
    """Positions of points (continuous (z, y, x) indices, all inside the grid) grouped by
    the field chunk they fall in, groups in chunk order, positions ascending within each.

    The points of chunk c need voxels from c's first voxel to one past its last
    (trilinear weights), so a read for one group touches chunk c and its next neighbour
    along each axis: at most 8 chunks.
    """
    if len(index_zyx) == 0:
        return []
    shape = np.asarray(shape_zyx)
    chunks = np.asarray(chunks_zyx)
    # Points in the half voxel before the first centre belong to the first chunk.
    cell = (np.clip(index_zyx, 0, shape - 1) // chunks).astype(np.int64)
    counts = -(-shape // chunks)
    key = np.ravel_multi_index(tuple(cell.T), tuple(counts))
    order = np.argsort(key, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(key[order])) + 1)


def _transform(field: ome_zarr.OmeZarrImage, points_xyz: np.ndarray,
               max_points_per_read: int) -> tuple[np.ndarray, np.ndarray]:
    """Transformed points (N, 3) and which points were inside the field's grid."""
    points = np.asarray(points_xyz, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {points.shape}")
    level = field.levels[0]
    index = level.grid.world_to_index(points)
    inside = _inside_index(index, level.grid.shape_zyx)
    out = np.full(points.shape, np.nan)
    rows = np.flatnonzero(inside)
    for group in chunk_groups(index[rows], level.grid.shape_zyx, level.chunks_zyx):
        selected = rows[group]
        # Pieces of one group share its box: the cap bounds memory, not what is read.
        for first in range(0, len(selected), max_points_per_read):
            piece = selected[first:first + max_points_per_read]
            # float32 field values, float64 sums; NaN in the field stays NaN.
            out[piece] = points[piece] + sample_field(field, points[piece])
    return out, inside


def transform_xyz(field: ome_zarr.OmeZarrImage, points_xyz: np.ndarray,
                  max_points_per_read: int = MAX_POINTS_PER_READ) -> np.ndarray:
    """World points (N, 3) in (x, y, z) order moved through the field: p + field(p),
    float64.

    The points are grouped by the field chunk they fall in and each group is sampled on
    its own, so every read touches only the (at most 8) chunks around that group. NaN
    for points outside the field's grid, for NaN coordinates, and where the field is NaN.
    """
    return _transform(field, points_xyz, max_points_per_read)[0]


def _coordinates(frame: pd.DataFrame, source: str) -> np.ndarray:
    """The frame's x, y, z as float64 (N, 3); missing values are NaN."""
    columns = []
    for name in COORDINATES:
        try:
            columns.append(frame[name].to_numpy(dtype=np.float64, na_value=np.nan))
        except (ValueError, TypeError):
            numbers = pd.to_numeric(frame[name], errors="coerce")
            bad = frame[name][numbers.isna() & frame[name].notna()]
            example = f" (row {bad.index[0]}: {bad.iloc[0]!r})" if len(bad) else ""
            raise InputError(f"{source}: column {name} holds values that are not "
                             f"numbers{example}") from None
    return np.stack(columns, axis=1)


def transform_batch(field: ome_zarr.OmeZarrImage, frame: pd.DataFrame,
                    source: str = "points",
                    max_points_per_read: int = MAX_POINTS_PER_READ) -> tuple[pd.DataFrame, int]:
    """A batch of points with x, y, z replaced by their transformed values (float64),
    and the number of points with coordinates that lie outside the field's grid.

    Every other column, the column order and the row order are kept. `source` names the
    input in error messages.
    """
    points = _coordinates(frame, source)
    moved, inside = _transform(field, points, max_points_per_read)
    outside = int(np.count_nonzero(~inside & np.all(np.isfinite(points), axis=1)))
    out = frame.copy()
    for axis, name in enumerate(COORDINATES):
        out[name] = moved[:, axis]
    return out, outside


def transform_points_batch(field_uri: str, mapping: str, points_uri: str, start: int,
                           stop: int, part_uri: str) -> dict:
    """Transform rows [start, stop) of a points file through a field and write them as a
    part. `mapping` is the field's direction (fixed_to_moving or moving_to_fixed), checked
    against the field's metadata.

    Returns {"rows": rows written, "outside": points outside the field's grid,
    "unmapped": points without a result (NaN), whatever the reason}.
    """
    field = open_field(field_uri, mapping=mapping)
    points = tables.open_points_file(points_uri, count_rows=False)
    frame = tables.read_batch(points, start, stop)
    moved, outside = transform_batch(field, frame, source=points.uri)
    tables.write_part(moved, part_uri, schema=tables.part_schema(points))
    unmapped = int(moved[list(COORDINATES)].isna().any(axis=1).sum())
    return {"rows": len(moved), "outside": outside, "unmapped": unmapped}
