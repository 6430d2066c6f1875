"""Displacement fields in DESIGN.md's contract, and sampling them at arbitrary points.

A field maps fixed points to moving points: moving = x + u(x). It is stored as an
OME-Zarr image with axes c, z, y, x, float32; c holds u's world components in (z, y, x)
order. Sampling is trilinear (compiled: dreg.field.trilinear), reads only the part of
the field around the points, and holds the value of the nearest border voxel outside the
field's grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dreg.errors import InputError
from dreg.field import trilinear
from dreg.grid import Grid, components_to_vectors, region_from_bounds
from dreg.io import mapped, ome_zarr

COMPONENTS = ["z", "y", "x"]
FIELD_CHUNK = 64
FIXED_TO_MOVING = "fixed_to_moving"  # the registration's field u, on the fixed grid
MOVING_TO_FIXED = "moving_to_fixed"  # its inverse v, on the moving grid
MAPPINGS = (FIXED_TO_MOVING, MOVING_TO_FIXED)


def field_attributes(grid: Grid, fixed: dict | None, moving_uri: str | None,
                     mapping: str = FIXED_TO_MOVING, moving_grid: Grid | None = None) -> dict:
    """The ``dreg`` object of a displacement field's root attributes (DESIGN.md)."""
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
    moving = {"uri": moving_uri, **(moving_grid.to_dict() if moving_grid else {})}
    return {
        "kind": "displacement_field",
        "mapping": mapping,
        "components": COMPONENTS,
        "grid": grid.to_dict(),
        "fixed": fixed or {},
        "moving": moving,
    }


def fixed_description(image: ome_zarr.OmeZarrImage) -> dict:
    """The fixed image as a field records it: URI, full-resolution grid, unit."""
    return {"uri": image.uri, **image.levels[0].grid.to_dict(), "unit": image.unit}


def create_field(
    uri: str,
    grid: Grid,
    fixed: dict | None = None,
    moving_uri: str | None = None,
    chunks: int | Sequence[int] = FIELD_CHUNK,
    overwrite: bool = False,
    mapping: str = FIXED_TO_MOVING,
    moving_grid: Grid | None = None,
    fill_value: float = 0.0,
) -> ome_zarr.OmeZarrImage:
    """An empty displacement field (zeros) ready to be written chunk by chunk.

    `mapping` says which way it maps: fixed_to_moving (u, on a grid over the fixed image)
    or moving_to_fixed (the inverse v, on a grid over the moving image, whose full-
    resolution grid `moving_grid` then records)."""
    return ome_zarr.create_image(
        uri,
        [grid],
        dtype="float32",
        chunks=chunks,
        components=3,
        dreg_attributes=field_attributes(grid, fixed, moving_uri, mapping, moving_grid),
        name="displacement_field",
        overwrite=overwrite,
        displacement=True,
        unit=(fixed or {}).get("unit"),
        fill_value=fill_value,
        # Float displacements barely compress, and compressing them was about half of the
        # reduce step's time: store the chunks raw.
        compressed=False,
    )


def open_field(uri: str, mapping: str = FIXED_TO_MOVING) -> ome_zarr.OmeZarrImage:
    """Open a displacement field, checking that it is one and maps the way expected."""
    image = ome_zarr.open_image(uri)
    if image.components != 3 or image.attributes.get("kind") != "displacement_field":
        raise InputError(f"{uri}: not a displacement field (needs dreg.kind displacement_field)")
    if image.attributes.get("mapping") != mapping:
        raise InputError(f"{uri}: field mapping must be {mapping}, "
                         f"not {image.attributes.get('mapping')}")
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
    weighs. Every chunk the box touches is decoded whole (mapped, for a raw local field:
    dreg.io.mapped), so a margin beyond that would decode the neighbouring chunks on
    every side (27 for the points of one chunk) even where no point reaches them.
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
    data = mapped.read_region(field, 0, region)  # (3, z, y, x), components z, y, x
    index -= lo[:, None]
    # SciPy's map_coordinates(order=1, mode="nearest") arithmetic, all components at once.
    components = trilinear.sample(data, index)
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
