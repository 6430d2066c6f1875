"""What the QC pictures show, as arrays: three orthogonal slices through the centre of
the fixed image's foreground, read from pyramid levels (never a whole image).

Every slice is a plane of one grid (a fixed pyramid level, the field grid, or a stage's
level): all these grids share the fixed image's origin and direction, so a plane's
physical coordinates along its two axes put them on common axes. The moving image
before and after registration is sampled on the fixed level's plane: through the
initial transform, and through the field (or read from the warped image, when OUT holds
one made from this field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dreg.apply.warp import sample_scattered
from dreg.field import open_field
from dreg.grid import Grid, Region, region_from_bounds
from dreg.io import ome_zarr
from dreg.qc.jacobian import region_determinant
from dreg.qc.plan import QcPlan, StageRef
from dreg.qc.sampling import (
    level_for_spacing,
    mean_spacing,
    sample_image,
    through_affine,
    through_field,
)
from dreg.registration.tiling import tile

AXIS_NAMES = ("z", "y", "x")
GRID_AXIS_NAMES = ("k", "j", "i")
MAX_FIELD_PIXELS = 1024  # a field slice wider than this is shown every n-th voxel
MAX_FOLD_MARKS = 5000
GRID_LINES = 16
CHECKER_SQUARES = 8


@dataclass(frozen=True)
class Plane:
    """The plane `index` along array axis `axis` (0 z, 1 y, 2 x) of `grid`: rows run
    along the first remaining axis, columns along the second."""

    grid: Grid
    axis: int
    index: int

    @property
    def rows_axis(self) -> int:
        return (1, 0, 0)[self.axis]

    @property
    def cols_axis(self) -> int:
        return (2, 2, 1)[self.axis]

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape_zyx[self.rows_axis], self.grid.shape_zyx[self.cols_axis]

    @property
    def region(self) -> Region:
        stop = list(self.grid.shape_zyx)
        start = [0, 0, 0]
        start[self.axis], stop[self.axis] = self.index, self.index + 1
        return region_from_bounds(start, stop)

    def points(self) -> np.ndarray:
        """World points (rows, cols, 3) of the plane's voxels."""
        return self.grid.region_points(self.region).reshape(*self.shape, 3)

    def coordinate(self, axis: int, index) -> np.ndarray:
        """Physical position along the grid's array axis `axis` (the world axis itself
        for an axis-aligned grid) of continuous indices."""
        ijk = 2 - axis
        direction = self.grid.direction_matrix[:, ijk]
        offset = float(np.dot(self.grid.origin_xyz, direction))
        return offset + self.grid.spacing_xyz[ijk] * np.asarray(index, dtype=float)

    @property
    def position(self) -> float:
        return float(self.coordinate(self.axis, self.index))

    def extent(self, step: int = 1) -> list[float]:
        """imshow's extent (left, right, bottom, top) of the plane shown every `step`
        voxels, with origin="lower"."""
        rows, cols = (math.ceil(n / step) for n in self.shape)
        return [float(self.coordinate(self.cols_axis, -0.5 * step)),
                float(self.coordinate(self.cols_axis, (cols - 0.5) * step)),
                float(self.coordinate(self.rows_axis, -0.5 * step)),
                float(self.coordinate(self.rows_axis, (rows - 0.5) * step))]

    @property
    def aligned(self) -> bool:
        """Whether the grid's axes are the world's (identity direction)."""
        return bool(np.allclose(self.grid.direction_matrix, np.eye(3)))

    def axis_name(self, axis: int) -> str:
        return AXIS_NAMES[axis] if self.aligned else f"{GRID_AXIS_NAMES[axis]} (grid axis)"

    @property
    def label(self) -> str:
        """The plane's name by its two axes, e.g. "x–y" (or "i–j" on a rotated grid)."""
        names = AXIS_NAMES if self.aligned else GRID_AXIS_NAMES
        return f"{names[self.cols_axis]}–{names[self.rows_axis]}"


def plane_through(grid: Grid, axis: int, centre_xyz) -> Plane:
    """The plane of `grid` along `axis` nearest to a world point."""
    index = grid.world_to_index(np.asarray(centre_xyz, dtype=float))[axis]
    return Plane(grid, axis, int(np.clip(np.round(index), 0, grid.shape_zyx[axis] - 1)))


def picture_planes(plan: QcPlan) -> list[Plane]:
    """The three planes of the fixed image's picture level through the centre."""
    grid = ome_zarr.open_image(plan.fixed).level(plan.picture_level).grid
    return [plane_through(grid, axis, plan.centre_xyz) for axis in range(3)]


def fixed_slice(plan: QcPlan, plane: Plane) -> np.ndarray:
    fixed = ome_zarr.open_image(plan.fixed)
    return ome_zarr.read_region(fixed, plan.picture_level, plane.region).reshape(
        plane.shape).astype(np.float32)


def _moving_level(image: ome_zarr.OmeZarrImage, plane: Plane) -> int:
    return level_for_spacing(image, mean_spacing(plane.grid))


def moving_before_slice(plan: QcPlan, plane: Plane) -> np.ndarray:
    """The moving image through the initial transform, on the plane (NaN outside it)."""
    moving = ome_zarr.open_image(plan.moving)
    return sample_image(moving, _moving_level(moving, plane),
                        through_affine(plan.initial, plane.points()))


def moving_after_slice(plan: QcPlan, plane: Plane) -> np.ndarray:
    """The registered moving image on the plane: read from the warped image when OUT
    holds one made from this field, else the moving image sampled at x + u(x)."""
    if plan.warped:
        warped = ome_zarr.open_image(plan.warped)
        return sample_image(warped, _moving_level(warped, plane), plane.points())
    moving = ome_zarr.open_image(plan.moving)
    return sample_image(moving, _moving_level(moving, plane),
                        through_field(open_field(plan.field), plane.points()))


def normalized(values: np.ndarray) -> np.ndarray:
    """Values scaled so that their 1st to 99th percentile spans 0 to 1 (NaN kept)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return values
    low, high = np.percentile(finite, (1, 99))
    return np.clip((values - low) / ((high - low) or 1.0), 0, 1)


def checkerboard(a: np.ndarray, b: np.ndarray, squares: int = CHECKER_SQUARES) -> np.ndarray:
    """Squares of `a` and `b` alternating, each image normalized on its own (so that
    images of different modalities or contrasts compare)."""
    size = max(1, math.ceil(max(a.shape) / squares))
    rows, cols = np.indices(a.shape)
    return np.where(((rows // size + cols // size) % 2) == 0, normalized(a), normalized(b))


@dataclass
class FieldSlice:
    """|u| and det J on a plane of the field grid, shown every `step` voxels, and the
    physical (column, row) positions of its folds (det J <= 0) at full resolution."""

    plane: Plane
    step: int
    magnitude: np.ndarray
    determinant: np.ndarray
    folds: np.ndarray  # (n, 2): column and row coordinates
    fold_voxels: int


def field_slice(plan: QcPlan, axis: int) -> FieldSlice:
    """The field's plane along `axis` through the centre, chunk column by chunk column
    (each read with its one-voxel halo, so det J is exactly what the tally counts)."""
    field = open_field(plan.field)
    plane = plane_through(plan.field_grid, axis, plan.centre_xyz)
    step = max(1, math.ceil(max(plane.shape) / MAX_FIELD_PIXELS))
    shown = tuple(math.ceil(n / step) for n in plane.shape)
    magnitude = np.zeros(shown, dtype=np.float32)
    det = np.zeros(shown, dtype=np.float32)
    folds = []
    chunks = list(field.levels[0].chunks_zyx)
    chunks[axis] = plan.field_grid.shape_zyx[axis]
    for column in ome_zarr.chunk_regions(plan.field_grid.shape_zyx, chunks):
        tile_region = list(column)
        tile_region[axis] = slice(plane.index, plane.index + 1)
        values, u = region_determinant(field, tuple(tile_region))
        values = values.reshape(_in_plane(tile_region, plane))
        length = np.sqrt((u.astype(np.float64) ** 2).sum(axis=0)).reshape(values.shape)
        r0, c0 = tile_region[plane.rows_axis].start, tile_region[plane.cols_axis].start
        fold_rows, fold_cols = np.nonzero(values <= 0)
        folds.append(np.stack([fold_cols + c0, fold_rows + r0], axis=1))
        i0, j0 = (-r0) % step, (-c0) % step
        part = (slice((r0 + i0) // step, None), slice((c0 + j0) // step, None))
        kept_det, kept_length = values[i0::step, j0::step], length[i0::step, j0::step]
        target = (slice(part[0].start, part[0].start + kept_det.shape[0]),
                  slice(part[1].start, part[1].start + kept_det.shape[1]))
        det[target], magnitude[target] = kept_det, kept_length
    index = np.concatenate(folds) if folds else np.zeros((0, 2))
    count = len(index)
    if count > MAX_FOLD_MARKS:
        index = index[np.linspace(0, count - 1, MAX_FOLD_MARKS).astype(int)]
    positions = np.stack([plane.coordinate(plane.cols_axis, index[:, 0]),
                          plane.coordinate(plane.rows_axis, index[:, 1])], axis=1)
    return FieldSlice(plane, step, magnitude, det, positions, count)


def _in_plane(region, plane: Plane) -> tuple[int, int]:
    return (region[plane.rows_axis].stop - region[plane.rows_axis].start,
            region[plane.cols_axis].stop - region[plane.cols_axis].start)


def deformation_lines(plan: QcPlan, plane: Plane, lines: int = GRID_LINES
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lines of the plane's grid moved by the in-plane part of u: each is (column
    coordinates, row coordinates) of x + u(x). Not exaggerated."""
    field = open_field(plan.field)
    rows, cols = plane.shape
    drawn = []
    for along_rows in (True, False):
        count, length = (rows, cols) if along_rows else (cols, rows)
        for at in np.linspace(0, count - 1, min(lines, count)):
            t = np.linspace(0, length - 1, min(length * 2, 400))
            index = np.zeros((len(t), 3))
            index[:, plane.axis] = plane.index
            index[:, plane.rows_axis] = at if along_rows else t
            index[:, plane.cols_axis] = t if along_rows else at
            u = sample_scattered(field, plane.grid.index_to_world(index))
            drawn.append((
                plane.coordinate(plane.cols_axis, index[:, plane.cols_axis])
                + u @ plane.grid.direction_matrix[:, 2 - plane.cols_axis],
                plane.coordinate(plane.rows_axis, index[:, plane.rows_axis])
                + u @ plane.grid.direction_matrix[:, 2 - plane.rows_axis]))
    return drawn


@dataclass
class BlockRectangle:
    """One block's core where it meets a plane, in the plane's physical coordinates."""

    left: float
    bottom: float
    width: float
    height: float
    status: str


def block_rectangles(plan: QcPlan, stage: StageRef, rows: list[dict], axis: int
                     ) -> list[BlockRectangle]:
    """The blocks of `stage` whose core meets the plane through the centre along
    `axis`, coloured later by their status from the stage's table."""
    grid = ome_zarr.open_image(plan.fixed).level(stage.level).grid
    field_grid = grid.coarsened(float(stage.field_grid_factor))
    plane = plane_through(grid, axis, plan.centre_xyz)
    status = {tuple(r["index"]): r["status"] for r in rows}
    rectangles = []
    for block in tile(grid.shape_zyx, stage.block_size, stage.overlap, field_grid.shape_zyx,
                      float(stage.field_grid_factor)):
        core = block.core
        if not core[axis].start <= plane.index < core[axis].stop:
            continue
        x0, x1 = (plane.coordinate(plane.cols_axis, v - 0.5)
                  for v in (core[plane.cols_axis].start, core[plane.cols_axis].stop))
        y0, y1 = (plane.coordinate(plane.rows_axis, v - 0.5)
                  for v in (core[plane.rows_axis].start, core[plane.rows_axis].stop))
        rectangles.append(BlockRectangle(float(x0), float(y0), float(x1 - x0), float(y1 - y0),
                                         status.get(tuple(block.index), "unknown")))
    return rectangles
