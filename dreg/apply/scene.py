"""The registration's place among coordinate systems: OUT's root group records, as OME-
Zarr 0.6 (RFC-5) `scene` metadata, that the fixed image's physical space maps to the
moving image's through OUT/field.ome.zarr, and back through OUT/inverse.ome.zarr once
the inverse exists (a `bijection`).

The two spaces are coordinate systems the scene declares itself ("fixed" and "moving"),
referenced by name without a `path`. OME-Zarr 0.6 allows a `path` only to "a multiscale
image subgroup in the Zarr hierarchy" that declares the named system; the images lie
outside OUT (DESIGN.md: OUT never holds its inputs) and, being OME-Zarr 0.5, declare no
coordinate systems. Where the images are is dreg's own record, the root's ``dreg``
object: ``{"fixed": {"uri": ...}, "moving": {"uri": ...}}``.
"""

from __future__ import annotations

import zarr

from dreg.io import ome_zarr, storage
from dreg.layout import FIELD_NAME, INVERSE_NAME

FIXED_SYSTEM = "fixed"
MOVING_SYSTEM = "moving"


def _system(name: str, unit: str | None) -> dict:
    """A scene coordinate system: the three space axes of an image's physical space."""
    return {"name": name, "axes": [{"name": a, "type": "space", **({"unit": unit} if unit else {})}
                                   for a in ome_zarr.SPATIAL_AXES]}


def _displacements(path: str) -> dict:
    return {"type": "displacements", "path": path, "interpolation": "linear"}


def scene_attributes(inverse: bool, unit: str | None = None) -> dict:
    """The `ome` object of OUT's root group; `unit` is the space axes' unit (the
    field's)."""
    ends = {"input": {"name": FIXED_SYSTEM}, "output": {"name": MOVING_SYSTEM}}
    if inverse:
        transform = {"type": "bijection", "name": "fixed to moving", **ends,
                     "forward": _displacements(FIELD_NAME),
                     "inverse": _displacements(INVERSE_NAME)}
    else:
        transform = {**_displacements(FIELD_NAME), "name": "fixed to moving", **ends}
    return {"version": ome_zarr.DISPLACEMENT_OME_VERSION,
            "scene": {"coordinateSystems": [_system(FIXED_SYSTEM, unit),
                                            _system(MOVING_SYSTEM, unit)],
                      "coordinateTransformations": [transform]}}


def write_scene(out_uri: str, fixed_uri: str, moving_uri: str, inverse: bool = False) -> None:
    """Make OUT's root a zarr group (if it is not one) whose `ome` attributes hold the
    scene and whose `dreg` attributes name the two images; other files under OUT are
    untouched. OUT/field.ome.zarr must exist (its unit is the scene's)."""
    out_uri = storage.normalize_uri(out_uri)
    unit = ome_zarr.open_image(storage.join(out_uri, FIELD_NAME)).unit
    group = zarr.open_group(storage.zarr_store(out_uri), mode="a", zarr_format=3)
    group.attrs.update({"ome": scene_attributes(inverse, unit),
                        "dreg": {"fixed": {"uri": fixed_uri}, "moving": {"uri": moving_uri}}})
