"""OME-Zarr image metadata: the image dataclass, reading NGFF 0.4/0.5/0.6 multiscales
metadata, and building what dreg writes.

OME-Zarr 0.5 image metadata is built with ome-zarr-models, which validates it as it is
built (axes, dimensionality, one scale and one translation per level). Displacement
fields are written as NGFF RFC-5 has them in OME-Zarr 0.6rc0, which ome-zarr-models does
not model yet: that metadata is a dict built here and checked in the tests.

A non-identity direction (not part of NGFF) is kept in the root attributes under
``dreg.direction``; displacement fields carry DESIGN.md's full ``dreg`` object.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import zarr

from dreg.errors import InputError
from dreg.grid import Grid, xyz_to_zyx
from dreg.io import storage

SPATIAL_AXES = ("z", "y", "x")
DEFAULT_CHUNK = 64
IMAGE_OME_VERSION = "0.5"
DISPLACEMENT_OME_VERSION = "0.6rc0"

@dataclass(frozen=True)
class ImageLevel:
    """One resolution level: its array path, grid, chunk shape and dtype."""

    path: str
    grid: Grid
    chunks_zyx: tuple[int, int, int]
    dtype: str


@dataclass(frozen=True)
class OmeZarrImage:
    """An OME-Zarr multiscale image's metadata; voxels stay in storage.

    `components` is None for a scalar image and the length of the c axis for a vector
    image (axes c, z, y, x). `attributes` is the root's ``dreg`` object, if any.
    `ome_version` is the NGFF version the metadata declares ("0.5", "0.4").
    """

    uri: str
    levels: tuple[ImageLevel, ...]
    components: int | None = None
    attributes: dict = field(default_factory=dict)
    ome_version: str = "0.5"
    unit: str | None = None

    @property
    def zarr_format(self) -> int:
        """The zarr format of the arrays: NGFF 0.4 and earlier are zarr v2, 0.5 is v3."""
        major, minor = (int(re.match(r"\d*", p).group() or 0)
                        for p in (self.ome_version.split(".") + ["0"])[:2])
        return 2 if (major, minor) <= (0, 4) else 3

    def level(self, index: int) -> ImageLevel:
        """Level `index`; negative values count from the coarsest (-1 is the coarsest)."""
        count = len(self.levels)
        if not -count <= index < count:
            raise InputError(
                f"{self.uri}: level {index} does not exist (the image has levels 0..{count - 1})"
            )
        return self.levels[index]

    def level_number(self, index: int) -> int:
        self.level(index)
        return index % len(self.levels)

    def describe(self) -> dict:
        """Metadata as plain JSON (what `dreg info` prints)."""
        return {
            "uri": self.uri,
            "components": self.components,
            "unit": self.unit,
            "direction": [list(r) for r in self.levels[0].grid.direction],
            "levels": [
                {
                    "path": lv.path,
                    "shape_zyx": list(lv.grid.shape_zyx),
                    "spacing_xyz": list(lv.grid.spacing_xyz),
                    "origin_xyz": list(lv.grid.origin_xyz),
                    "chunks_zyx": list(lv.chunks_zyx),
                    "dtype": lv.dtype,
                }
                for lv in self.levels
            ],
        }



# ----------------------------------------------------------------------------- reading



def _multiscales(attrs: dict) -> tuple[dict, str]:
    """The first multiscale of 0.5 (under "ome") or 0.4 (top level) metadata, and its
    version."""
    if "ome" in attrs and "multiscales" in attrs["ome"]:
        return attrs["ome"]["multiscales"][0], str(attrs["ome"].get("version", "0.5"))
    if "multiscales" in attrs:
        first = attrs["multiscales"][0]
        return first, str(first.get("version", "0.4"))
    raise KeyError("multiscales")


def _flattened(transforms: Sequence[dict]) -> list[dict]:
    """A transform list with NGFF 0.6 sequences spelled out."""
    out = []
    for t in transforms:
        out += _flattened(t["transformations"]) if t.get("type") == "sequence" else [t]
    return out


def _scale_translation(transforms: Sequence[dict], ndim: int) -> tuple[list, list]:
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for t in _flattened(transforms):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            translation = [float(v) for v in t["translation"]]
    if len(scale) != ndim or len(translation) != ndim:
        raise ValueError(f"scale and translation need {ndim} values each")
    return scale, translation


def _dataset_transform(multiscale: dict, dataset: dict, ndim: int) -> tuple[list, list]:
    """Scale and translation of one level: the dataset's own, then the multiscale's
    shared coordinateTransformations (NGFF allows both; they compose in that order)."""
    scale, translation = _scale_translation(dataset.get("coordinateTransformations", []), ndim)
    shared = multiscale.get("coordinateTransformations")
    if shared:
        outer_scale, outer_translation = _scale_translation(shared, ndim)
        scale = [s * o for s, o in zip(scale, outer_scale, strict=True)]
        translation = [
            t * o + u for t, o, u in zip(translation, outer_scale, outer_translation, strict=True)
        ]
    return scale, translation


def _check_axes(uri: str, axes: list[str]) -> None:
    spatial = [a for a in axes if a in SPATIAL_AXES]
    if spatial != list(SPATIAL_AXES) or len(axes) not in (3, 4) or (
        len(axes) == 4 and axes[0] != "c"
    ):
        raise InputError(
            f"{uri}: needs a 3D image with axes z, y, x (or c, z, y, x); it has axes {axes}"
        )


def _axes(multiscale: dict) -> list:
    """The axes of 0.4/0.5 metadata, or of the first coordinate system of 0.6's."""
    if "axes" in multiscale:
        return multiscale["axes"]
    return multiscale["coordinateSystems"][0]["axes"]



# ----------------------------------------------------------------------------- writing

def _space_axes(unit: str | None) -> list[dict]:
    return [{"name": a, "type": "space", **({"unit": unit} if unit else {})}
            for a in SPATIAL_AXES]


def _level_transforms(grid: Grid, lead: int) -> list[dict]:
    return [
        {"type": "scale", "scale": [1.0] * lead + list(xyz_to_zyx(grid.spacing_xyz))},
        {"type": "translation", "translation": [0.0] * lead + list(xyz_to_zyx(grid.origin_xyz))},
    ]


def _image_multiscale(grids: Sequence[Grid], components: int | None, name: str,
                      unit: str | None):
    """The multiscale of an OME-Zarr 0.5 image, built and validated by ome-zarr-models:
    axes (c, z, y, x) or (z, y, x), and per level one scale then one translation."""
    # Imported here: loading the models takes a second or two, which a command that only
    # reads images (and the CLI's first checks) should not pay.
    from ome_zarr_models.common.coordinate_transformations import (
        VectorScale,
        VectorTranslation,
    )
    from ome_zarr_models.v05.axes import Axis
    from ome_zarr_models.v05.multiscales import Dataset, Multiscale

    axes = [Axis(name=a, type="space", unit=unit) for a in SPATIAL_AXES]
    if components is not None:
        axes = [Axis(name="c", type="channel"), *axes]
    lead = 0 if components is None else 1
    datasets = [
        Dataset(path=str(k), coordinateTransformations=(
            VectorScale.build([1.0] * lead + list(xyz_to_zyx(g.spacing_xyz))),
            VectorTranslation.build([0.0] * lead + list(xyz_to_zyx(g.origin_xyz)))))
        for k, g in enumerate(grids)
    ]
    return Multiscale(name=name, axes=axes, datasets=tuple(datasets))


def _ngff_attrs(grids: Sequence[Grid], components: int | None, name: str,
                unit: str | None) -> dict:
    """OME-Zarr 0.5 multiscales metadata (what viewers read), as the JSON of the
    ome-zarr-models image attributes. Absent optional fields (a unit, the multiscale's
    type and metadata) are left out, not written as null.

    Raises ValueError (pydantic's ValidationError) when the levels do not make valid
    OME-Zarr 0.5, for example a level finer than the one before it."""
    from ome_zarr_models.v05.image import ImageAttrs

    attrs = ImageAttrs(version=IMAGE_OME_VERSION,
                       multiscales=[_image_multiscale(grids, components, name, unit)])
    return {"ome": attrs.model_dump(mode="json", exclude_none=True)}


def _displacement_attrs(grids: Sequence[Grid], name: str, unit: str | None) -> dict:
    """Displacement-field metadata as NGFF RFC-5 has it in OME-Zarr 0.6rc0: a coordinate
    system whose first axis is the vector axis, typed displacement and discrete, and each
    level mapped into it by a scale-then-translation sequence."""
    system = {"name": "physical",
              "axes": [{"name": "c", "type": "displacement", "discrete": True},
                       *_space_axes(unit)]}
    datasets = [{"path": str(k), "coordinateTransformations": [{
        "type": "sequence", "input": {"path": str(k)}, "output": {"name": "physical"},
        "transformations": _level_transforms(g, 1)}]} for k, g in enumerate(grids)]
    return {"ome": {"version": DISPLACEMENT_OME_VERSION, "multiscales": [
        {"name": name, "coordinateSystems": [system], "datasets": datasets}]}}


def update_attributes(uri: str, updates: dict) -> None:
    """Merge `updates` into an image's ``dreg`` root attributes (one small write)."""
    group = zarr.open_group(storage.zarr_store(uri), mode="r+", zarr_format=3)
    group.attrs["dreg"] = {**dict(group.attrs.get("dreg") or {}), **updates}
