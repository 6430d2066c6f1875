"""The Jacobian determinant of the registration's map x ↦ x + u(x), in physical space.

det J = det(I + ∇u), with the derivatives taken along world axes: u's components are
world displacements in physical units, and the derivative along a voxel axis is turned
into one along world axes through the grid's spacing and direction. det J is the local
change of volume: 1 keeps it, 0.5 halves it, and det J ≤ 0 is a fold, a place where the
map turns space inside out (no physical deformation does that).

Computed chunk by chunk on the field's own grid: each chunk is read with a one-voxel
halo, so that every voxel gets central differences except at the field's border, where
the differences are one-sided. A tally of a chunk is small (extremes, counts, and a
sparse histogram for percentiles) and tallies merge, so that any number of chunks sum
to the whole field's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dreg.grid import Grid, Region, region_from_bounds, relative_region
from dreg.io import ome_zarr

HALO = 1
# A histogram of det J for its percentiles: fine bins over the range smooth fields
# occupy, with the extremes caught by the first and last bin (bounded by min and max).
HISTOGRAM_LOW = -2.0
HISTOGRAM_WIDTH = 1e-3
HISTOGRAM_BINS = 6000


def world_derivative_matrix(grid: Grid) -> np.ndarray:
    """D with D[c, b] = ∂(array index c)/∂(world coordinate b), both in z, y, x order."""
    inverse = np.linalg.inv(grid.index_to_world_matrix)  # rows i, j, k; columns x, y, z
    return inverse[::-1, ::-1]


def determinant(u: np.ndarray, grid: Grid, inner: Region | None = None) -> np.ndarray:
    """det(I + ∇u) at the voxels `inner` (relative to `u`; default all) of `u`, an array
    (3, z, y, x) of world displacements (components z, y, x) on voxels of `grid`.

    Derivatives are central differences where both neighbours lie in `u`, one-sided at
    its faces, and zero along an axis `u` has one voxel on. float64 throughout.
    """
    shape = u.shape[1:]
    inner = inner or region_from_bounds((0, 0, 0), shape)
    inner_shape = tuple(s.stop - s.start for s in inner)
    gradient = np.empty((3, 3, *inner_shape))  # [component, array axis, z, y, x]
    for axis in range(3):
        crop = list(inner)
        crop[axis] = slice(None)
        part = u[(slice(None), *crop)].astype(np.float64, copy=False)
        at = np.arange(inner[axis].start, inner[axis].stop)
        lower, upper = np.maximum(at - 1, 0), np.minimum(at + 1, shape[axis] - 1)
        step = (upper - lower).astype(np.float64)
        step[step == 0] = np.inf  # one voxel along this axis: no change along it
        broadcast = [1, 1, 1, 1]
        broadcast[axis + 1] = -1
        gradient[:, axis] = ((np.take(part, upper, axis=axis + 1)
                              - np.take(part, lower, axis=axis + 1))
                             / step.reshape(broadcast))
    derivative = world_derivative_matrix(grid)
    if np.count_nonzero(derivative) == 3 and np.all(np.diag(derivative) != 0):
        # The usual axis-aligned grid: the chain rule only scales each axis.
        gradient *= np.diag(derivative)[None, :, None, None, None]
        jacobian = gradient
    else:
        jacobian = np.einsum("acxyz,cb->abxyz", gradient, derivative)
    for a in range(3):
        jacobian[a, a] += 1.0
    return _det3(jacobian)


def _det3(m: np.ndarray) -> np.ndarray:
    """Determinants of a field of 3x3 matrices m[row, column, ...]."""
    return (m[0, 0] * (m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1])
            - m[0, 1] * (m[1, 0] * m[2, 2] - m[1, 2] * m[2, 0])
            + m[0, 2] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0]))


def with_halo(region: Region, shape_zyx, halo: int = HALO) -> tuple[Region, Region]:
    """The region grown by `halo` voxels (cropped at the grid's border), and the
    original region relative to the grown one."""
    grown = region_from_bounds([max(s.start - halo, 0) for s in region],
                               [min(s.stop + halo, n) for s, n in zip(region, shape_zyx,
                                                                      strict=True)])
    return grown, relative_region(region, grown)


def region_determinant(field: ome_zarr.OmeZarrImage, region: Region
                       ) -> tuple[np.ndarray, np.ndarray]:
    """det J on a region of the field's grid (read with a one-voxel halo), and u there."""
    grid = field.levels[0].grid
    grown, inner = with_halo(region, grid.shape_zyx)
    u = ome_zarr.read_region(field, 0, grown)
    return determinant(u, grid, inner), u[(slice(None), *inner)]


@dataclass
class JacobianTally:
    """det J over some voxels: extremes, fold count and a sparse histogram. Merges.
    A voxel where det J is not a number (a field holding NaN or infinity) is counted
    apart, in `nonfinite`, and nowhere else."""

    voxels: int = 0
    nonpositive: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    bins: dict[int, int] = field(default_factory=dict)
    nonfinite: int = 0

    @classmethod
    def of(cls, det: np.ndarray) -> JacobianTally:
        values = np.asarray(det, dtype=np.float64).ravel()
        finite = values[np.isfinite(values)]
        nonfinite = int(values.size - finite.size)
        if finite.size == 0:
            return cls(voxels=int(values.size), nonfinite=nonfinite)
        index = np.clip(np.floor((finite - HISTOGRAM_LOW) / HISTOGRAM_WIDTH), 0,
                        HISTOGRAM_BINS - 1).astype(np.int64)
        which, counts = np.unique(index, return_counts=True)
        return cls(voxels=int(values.size), nonpositive=int(np.count_nonzero(finite <= 0)),
                   min=float(finite.min()), max=float(finite.max()),
                   bins=dict(zip(which.tolist(), counts.tolist(), strict=True)),
                   nonfinite=nonfinite)

    def merge(self, other: JacobianTally) -> JacobianTally:
        bins = dict(self.bins)
        for index, count in other.bins.items():
            bins[index] = bins.get(index, 0) + count
        return JacobianTally(self.voxels + other.voxels, self.nonpositive + other.nonpositive,
                             min(self.min, other.min), max(self.max, other.max), bins,
                             self.nonfinite + other.nonfinite)

    def quantile(self, q: float) -> float | None:
        """The q-quantile of the finite values, interpolated within its histogram bin
        (bins 1e-3 wide; exact when all values are equal), or None when there are none."""
        counted = self.voxels - self.nonfinite
        if not counted:
            return None
        target = q * counted
        seen = 0
        for index in sorted(self.bins):
            count = self.bins[index]
            if seen + count >= target:
                low = self.min if index == 0 else HISTOGRAM_LOW + index * HISTOGRAM_WIDTH
                high = (self.max if index == HISTOGRAM_BINS - 1
                        else HISTOGRAM_LOW + (index + 1) * HISTOGRAM_WIDTH)
                low, high = max(low, self.min), min(high, self.max)
                value = low + (target - seen) / count * (high - low)
                return float(min(max(value, self.min), self.max))
            seen += count
        return self.max

    def summary(self) -> dict:
        """The numbers qc.json holds: min, p01, max, share_nonpositive, voxels."""
        empty = self.voxels == self.nonfinite
        return {
            "min": None if empty else self.min,
            "p01": self.quantile(0.01),
            "max": None if empty else self.max,
            "share_nonpositive": self.nonpositive / self.voxels if self.voxels else 0.0,
            "nonpositive": self.nonpositive,
            "voxels": self.voxels,
            "nonfinite": self.nonfinite,
        }
