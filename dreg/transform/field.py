"""Displacement fields in DESIGN.md's contract, and sampling them at arbitrary points.

A field maps fixed points to moving points: moving = x + u(x). It is stored as an
OME-Zarr image with axes c, z, y, x, float32; c holds u's world components in (z, y, x)
order. Sampling is trilinear, reads only the part of the field around the points, and
holds the value of the nearest border voxel outside the field's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dreg.errors import InputError
from dreg.grid import Grid, components_to_vectors, region_from_bounds
from dreg.io import ome_zarr

COMPONENTS = ["z", "y", "x"]
FIELD_CHUNK = 64


def field_attributes(grid: Grid, fixed: dict | None, moving_uri: str | None) -> dict:
    """The ``dreg`` object of a displacement field's root attributes (DESIGN.md)."""
    return {
        "kind": "displacement_field",
        "mapping": "fixed_to_moving",
        "components": COMPONENTS,
        "grid": grid.to_dict(),
        "fixed": fixed or {},
        "moving": {"uri": moving_uri},
    }


def fixed_description(uri: str, grid: Grid) -> dict:
    return {"uri": uri, **grid.to_dict()}


def create_field(
    uri: str,
    grid: Grid,
    fixed: dict | None = None,
    moving_uri: str | None = None,
    chunks: int | Sequence[int] = FIELD_CHUNK,
    overwrite: bool = False,
) -> ome_zarr.OmeZarrImage:
    """An empty displacement field (zeros) ready to be written chunk by chunk."""
    return ome_zarr.create_image(
        uri,
        [grid],
        dtype="float32",
        chunks=chunks,
        components=3,
        dreg_attributes=field_attributes(grid, fixed, moving_uri),
        name="displacement_field",
        overwrite=overwrite,
        # Float displacements barely compress, and compressing them was about half of the
        # reduce step's time: store the chunks raw.
        compressed=False,
    )


def open_field(uri: str) -> ome_zarr.OmeZarrImage:
    """Open a displacement field, checking that it is one."""
    image = ome_zarr.open_image(uri)
    if image.components != 3 or image.attributes.get("kind") != "displacement_field":
        raise InputError(f"{uri}: not a displacement field (needs dreg.kind displacement_field)")
    if image.attributes.get("mapping") != "fixed_to_moving":
        raise InputError(f"{uri}: field mapping must be fixed_to_moving")
    return image


@dataclass(frozen=True)
class AffineTransform:
    """moving = matrix @ fixed + translation, in world (x, y, z) coordinates."""

    matrix: tuple[tuple[float, float, float], ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def displacement(self, points_xyz: np.ndarray) -> np.ndarray:
        points = np.asarray(points_xyz, dtype=float)
        moved = points @ np.asarray(self.matrix, dtype=float).T + np.asarray(self.translation)
        return moved - points

    @classmethod
    def identity(cls) -> AffineTransform:
        return cls()


def sample_field(field: ome_zarr.OmeZarrImage, points_xyz: np.ndarray) -> np.ndarray:
    """u at world points (..., 3) as world (x, y, z) vectors (..., 3), in the field's
    dtype (float32).

    Reads only the box of the field that the points need: from the floor of their
    smallest index to the ceiling of their largest, the voxels trilinear interpolation
    weighs. Every chunk the box touches is decoded whole, so a margin beyond that would
    decode the neighbouring chunks on every side (27 for the points of one chunk) even
    where no point reaches them.
    """
    points = np.asarray(points_xyz, dtype=float)
    flat = points.reshape(-1, 3)
    if flat.shape[0] == 0:
        return np.zeros_like(points)
    grid = field.levels[0].grid
    shape = np.array(grid.shape_zyx)
    # (3, N) rows z, y, x: contiguous rows make the bounds and map_coordinates fast.
    index = np.ascontiguousarray(grid.world_to_index(flat).T)
    lo = np.clip(np.floor(index.min(axis=1)).astype(int), 0, shape - 1)
    hi = np.clip(np.ceil(index.max(axis=1)).astype(int) + 1, lo + 1, shape)
    region = region_from_bounds(lo, hi)
    data = ome_zarr.read_region(field, 0, region)  # (3, z, y, x), components z, y, x
    index -= lo[:, None]
    components = np.stack([ndimage.map_coordinates(data[c], index, order=1, mode="nearest")
                           for c in range(3)])
    return components_to_vectors(components).reshape(points.shape)


def as_transform(previous: AffineTransform | str) -> AffineTransform | ome_zarr.OmeZarrImage:
    """A transform handed on between stages (an affine, or the URI of a field) as
    something `displacement_of` can sample."""
    return previous if isinstance(previous, AffineTransform) else open_field(previous)


def displacement_of(previous, points_xyz: np.ndarray) -> np.ndarray:
    """u_prev at world points, whether the previous transform is an affine or a field."""
    if isinstance(previous, AffineTransform):
        return previous.displacement(points_xyz)
    return sample_field(previous, points_xyz)
