"""The registration's place among coordinate systems: OUT's root group records, as OME-
Zarr 0.6 (RFC-5) `scene` metadata, that the fixed image's physical space maps to the
moving image's through OUT/field.ome.zarr, and back through OUT/inverse.ome.zarr once
the inverse exists (a `bijection`).
"""

from __future__ import annotations

import zarr

from dreg.io import ome_zarr, storage
from dreg.layout import FIELD_NAME, INVERSE_NAME

SYSTEM = "physical"


def _reference(out_uri: str, image_uri: str) -> dict:
    """A coordinate system reference: a path below OUT where the image lives there, else
    the image's own URI."""
    prefix = out_uri.rstrip("/") + "/"
    path = image_uri[len(prefix):] if image_uri.startswith(prefix) else image_uri
    return {"name": SYSTEM, "path": path}


def _displacements(path: str) -> dict:
    return {"type": "displacements", "path": path, "interpolation": "linear"}


def scene_attributes(out_uri: str, fixed_uri: str, moving_uri: str, inverse: bool) -> dict:
    """The `ome` object of OUT's root group."""
    ends = {"input": _reference(out_uri, fixed_uri), "output": _reference(out_uri, moving_uri)}
    if inverse:
        transform = {"type": "bijection", "name": "fixed to moving", **ends,
                     "forward": _displacements(FIELD_NAME),
                     "inverse": _displacements(INVERSE_NAME)}
    else:
        transform = {**_displacements(FIELD_NAME), "name": "fixed to moving", **ends}
    return {"version": ome_zarr.DISPLACEMENT_OME_VERSION,
            "scene": {"coordinateTransformations": [transform]}}


def write_scene(out_uri: str, fixed_uri: str, moving_uri: str, inverse: bool = False) -> None:
    """Make OUT's root a zarr group (if it is not one) whose `ome` attributes hold the
    scene; other files under OUT are untouched."""
    out_uri = storage.normalize_uri(out_uri)
    group = zarr.open_group(storage.zarr_store(out_uri), mode="a", zarr_format=3)
    group.attrs["ome"] = scene_attributes(out_uri, fixed_uri, moving_uri, inverse)
