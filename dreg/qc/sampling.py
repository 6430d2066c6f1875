"""Sample images at world points for quality control: a few slices and a coarse lattice.

Reads only the boxes of a pyramid level that the points need; a point set whose box
would be large (a plane tilted through a volume, a wild deformation) is split in two
along its widest axis until each part's box is small. Outside the image the value is
NaN, never a made-up zero, so that a picture shows where the image ends and a
similarity counts only the voxels that both images cover.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from dreg.apply.warp import OUTSIDE_TOLERANCE, sample_scattered
from dreg.field import AffineTransform
from dreg.grid import Grid, region_from_bounds, region_shape
from dreg.io import ome_zarr

MAX_BOX_VOXELS = 64**3 * 4


def sample_image(image: ome_zarr.OmeZarrImage, level: int, points_xyz: np.ndarray,
                 max_box_voxels: int = MAX_BOX_VOXELS) -> np.ndarray:
    """Trilinear values of a scalar image's level at world points (..., 3), float32,
    NaN where a point lies outside the level's voxel centres."""
    points = np.asarray(points_xyz, dtype=float)
    grid = image.level(level).grid
    index = grid.world_to_index(points.reshape(-1, 3))
    values = np.full(index.shape[0], np.nan, dtype=np.float32)
    inside = _inside(index, grid)
    if inside.any():
        placed = np.clip(index[inside], 0, np.asarray(grid.shape_zyx) - 1)
        values[inside] = _interpolate(image, level, placed, max_box_voxels)
    return values.reshape(points.shape[:-1])


def inside_image(image: ome_zarr.OmeZarrImage, level: int, points_xyz: np.ndarray
                 ) -> np.ndarray:
    """Which world points (..., 3) lie within the level's voxel centres (as
    `sample_image` decides it)."""
    points = np.asarray(points_xyz, dtype=float)
    index = image.level(level).grid.world_to_index(points.reshape(-1, 3))
    return _inside(index, image.level(level).grid).reshape(points.shape[:-1])


def _inside(index: np.ndarray, grid: Grid) -> np.ndarray:
    last = np.asarray(grid.shape_zyx) - 1
    return np.all((index >= -OUTSIDE_TOLERANCE) & (index <= last + OUTSIDE_TOLERANCE),
                  axis=-1)


def _interpolate(image: ome_zarr.OmeZarrImage, level: int, index: np.ndarray,
                 max_box_voxels: int) -> np.ndarray:
    lo = np.floor(index.min(axis=0)).astype(int)
    hi = np.ceil(index.max(axis=0)).astype(int) + 1
    box = region_from_bounds(lo, hi)
    if math.prod(region_shape(box)) > max_box_voxels and len(index) > 1:
        # Split at the median of the widest axis: each half spans about half the box.
        axis = int(np.argmax(hi - lo))
        order = np.argsort(index[:, axis], kind="stable")
        half = len(order) // 2
        out = np.empty(len(index), dtype=np.float32)
        for part in (order[:half], order[half:]):
            out[part] = _interpolate(image, level, index[part], max_box_voxels)
        return out
    data = ome_zarr.read_region(image, level, box).astype(np.float32, copy=False)
    coords = np.ascontiguousarray((index - lo).T)
    return ndimage.map_coordinates(data, coords, order=1, mode="nearest").astype(np.float32)


def through_field(field: ome_zarr.OmeZarrImage, points_xyz: np.ndarray) -> np.ndarray:
    """x + u(x) at world points (..., 3), reading the field one chunk's points at a time."""
    points = np.asarray(points_xyz, dtype=float)
    flat = points.reshape(-1, 3)
    return (flat + sample_scattered(field, flat)).reshape(points.shape)


def through_affine(affine: AffineTransform, points_xyz: np.ndarray) -> np.ndarray:
    """The initial transform's image of world points (..., 3)."""
    points = np.asarray(points_xyz, dtype=float)
    return points + affine.displacement(points)


def level_for_spacing(image: ome_zarr.OmeZarrImage, spacing: float) -> int:
    """The coarsest level whose voxels are no coarser than `spacing` (geometric mean of
    the spacings); level 0 when every level is coarser."""
    chosen = 0
    for number, lv in enumerate(image.levels):
        if mean_spacing(lv.grid) <= spacing * (1 + 1e-6):
            chosen = number
    return chosen


def mean_spacing(grid: Grid) -> float:
    """A grid's voxel size as one number: the geometric mean of its spacings."""
    return float(np.prod(grid.spacing_xyz) ** (1 / 3))
