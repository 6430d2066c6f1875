"""A voxel grid in ITK's physical space.

Arrays are in NumPy order (z, y, x); ITK's spacing, origin and direction are (x, y, z).
This module is the one place that converts between the two: a voxel at array index
(k, j, i) sits at the world point ``origin + direction @ (spacing * (i, j, k))``.
Points handled here are arrays of shape (..., 3) in world (x, y, z) order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Region = tuple[slice, slice, slice]
"""The one box type: voxels in NumPy (z, y, x) order, explicit non-negative start and
stop (stop exclusive), no step. It indexes arrays directly."""


def _as_tuple(values, n: int, name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != n:
        raise ValueError(f"{name} must have {n} values, got {len(out)}")
    return out


@dataclass(frozen=True)
class Grid:
    """Shape and physical placement of a 3D voxel grid.

    Attributes:
        shape_zyx: number of voxels along z, y, x.
        spacing_xyz: voxel spacing along the index axes i, j, k (x, y, z), physical units.
        origin_xyz: world point of voxel (0, 0, 0).
        direction: 3x3 matrix whose columns are the world directions of the i, j, k axes.
    """

    shape_zyx: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[tuple[float, float, float], ...] = field(
        default=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    )

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape_zyx)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape_zyx must be three positive integers, got {self.shape_zyx}")
        spacing = _as_tuple(self.spacing_xyz, 3, "spacing_xyz")
        if not np.all(np.isfinite(spacing)):
            raise ValueError(f"spacing_xyz must be finite, got {spacing}")
        if min(spacing) <= 0:
            raise ValueError(f"spacing_xyz must be positive, got {spacing}")
        origin = _as_tuple(self.origin_xyz, 3, "origin_xyz")
        if not np.all(np.isfinite(origin)):
            raise ValueError(f"origin_xyz must be finite, got {origin}")
        direction = np.asarray(self.direction, dtype=float)
        # Orthonormal, to the precision of a float32 direction (as NIfTI stores it).
        if direction.shape != (3, 3) or not np.all(np.isfinite(direction)) or not np.allclose(
            direction.T @ direction, np.eye(3), atol=1e-4
        ):
            raise ValueError(f"direction must be a 3x3 orthonormal matrix, got {self.direction}")
        object.__setattr__(self, "shape_zyx", shape)
        object.__setattr__(self, "spacing_xyz", spacing)
        object.__setattr__(self, "origin_xyz", origin)
        object.__setattr__(self, "direction", tuple(tuple(float(v) for v in r) for r in direction))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float)

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        """3x3 matrix taking an (i, j, k) index step to a world (x, y, z) step."""
        return self.direction_matrix * np.asarray(self.spacing_xyz)[None, :]

    def index_to_world(self, index_zyx: np.ndarray) -> np.ndarray:
        """World (x, y, z) points of continuous indices given as (..., 3) in (z, y, x) order."""
        ijk = zyx_to_xyz(np.asarray(index_zyx, dtype=float))
        return ijk @ self.index_to_world_matrix.T + np.asarray(self.origin_xyz)

    def world_to_index(self, points_xyz: np.ndarray) -> np.ndarray:
        """Continuous (z, y, x) indices of world points given as (..., 3) in (x, y, z) order."""
        inverse = np.linalg.inv(self.index_to_world_matrix)
        ijk = (np.asarray(points_xyz, dtype=float) - np.asarray(self.origin_xyz)) @ inverse.T
        return xyz_to_zyx(ijk)

    def region_points(self, region: Region) -> np.ndarray:
        """World points of every voxel of a region, shape (nz, ny, nx, 3)."""
        axes = [np.arange(s.start, s.stop, dtype=float) for s in region]
        index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        return self.index_to_world(index)

    def subgrid(self, region: Region) -> Grid:
        """The grid of a region of this grid (same spacing and direction)."""
        start = np.array([s.start for s in region], dtype=float)
        return Grid(
            shape_zyx=tuple(s.stop - s.start for s in region),
            spacing_xyz=self.spacing_xyz,
            origin_xyz=tuple(self.index_to_world(start)),
            direction=self.direction,
        )

    def coarsened(self, factor: float, shape_zyx: tuple[int, int, int] | None = None) -> Grid:
        """A grid with the same origin and direction and `factor` times the spacing.

        By default its shape covers this grid's voxel centres: voxel j sits at this
        grid's continuous index j * factor.
        """
        if shape_zyx is None:
            shape_zyx = tuple(int(np.floor((n - 1) / factor)) + 1 for n in self.shape_zyx)
            # Cover the last voxel centre exactly or beyond it.
            shape_zyx = tuple(
                s + (1 if (s - 1) * factor < n - 1 else 0)
                for s, n in zip(shape_zyx, self.shape_zyx, strict=True)
            )
        return Grid(
            shape_zyx=shape_zyx,
            spacing_xyz=tuple(s * factor for s in self.spacing_xyz),
            origin_xyz=self.origin_xyz,
            direction=self.direction,
        )

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world bounding box (min, max) of the voxel centres."""
        corners = np.array(
            [[z, y, x] for z in (0, self.shape_zyx[0] - 1)
             for y in (0, self.shape_zyx[1] - 1) for x in (0, self.shape_zyx[2] - 1)],
            dtype=float,
        )
        points = self.index_to_world(corners)
        return points.min(axis=0), points.max(axis=0)

    def to_dict(self) -> dict:
        """The grid as the JSON object used in DESIGN.md's data contracts."""
        return {
            "origin_xyz": list(self.origin_xyz),
            "spacing_xyz": list(self.spacing_xyz),
            "direction": [list(r) for r in self.direction],
            "shape_zyx": list(self.shape_zyx),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Grid:
        return cls(
            shape_zyx=tuple(data["shape_zyx"]),
            spacing_xyz=tuple(data["spacing_xyz"]),
            origin_xyz=tuple(data["origin_xyz"]),
            direction=tuple(tuple(r) for r in data["direction"]),
        )


def xyz_to_zyx(values):
    """Reverse the last axis: ITK's (x, y, z) order to NumPy's (z, y, x). A sequence
    gives a tuple, an array a view."""
    if isinstance(values, np.ndarray):
        return values[..., ::-1]
    return tuple(values)[::-1]


def zyx_to_xyz(values):
    """Reverse the last axis: NumPy's (z, y, x) order to ITK's (x, y, z)."""
    return xyz_to_zyx(values)


def vectors_to_components(vectors_xyz: np.ndarray) -> np.ndarray:
    """World vectors (..., 3) in (x, y, z) order as components (3, ...) in (z, y, x) order,
    the layout of a displacement field's c axis."""
    return np.moveaxis(xyz_to_zyx(np.asarray(vectors_xyz)), -1, 0)


def components_to_vectors(components_zyx: np.ndarray) -> np.ndarray:
    """Components (3, ...) in (z, y, x) order as world vectors (..., 3) in (x, y, z) order."""
    return zyx_to_xyz(np.moveaxis(np.asarray(components_zyx), 0, -1))


def region_shape(region: Region) -> tuple[int, int, int]:
    return tuple(s.stop - s.start for s in region)


def region_from_bounds(start, stop) -> Region:
    """The region from `start` (inclusive) to `stop` (exclusive) along z, y, x."""
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))


def whole_region(shape_zyx) -> Region:
    return region_from_bounds((0, 0, 0), shape_zyx)


def intersect_regions(a: Region, b: Region) -> Region | None:
    """The overlap of two regions, or None when they do not overlap."""
    start = [max(x.start, y.start) for x, y in zip(a, b, strict=True)]
    stop = [min(x.stop, y.stop) for x, y in zip(a, b, strict=True)]
    if any(lo >= hi for lo, hi in zip(start, stop, strict=True)):
        return None
    return region_from_bounds(start, stop)


def relative_region(region: Region, origin: Region) -> Region:
    """`region` in the coordinates of a box that starts where `origin` starts."""
    return tuple(slice(r.start - o.start, r.stop - o.start)
                 for r, o in zip(region, origin, strict=True))


def region_to_list(region: Region) -> list[list[int]]:
    """A region as JSON: [[start, stop], ...] along z, y, x."""
    return [[s.start, s.stop] for s in region]
