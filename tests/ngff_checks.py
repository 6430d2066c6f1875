"""The rules of OME-Zarr 0.5 images (through ome-zarr-models) and of NGFF RFC-5
displacement fields and scenes as released in 0.6rc0, applied by hand (the 0.6rc0
schemas axes, coordinate_systems, image and scene, and RFC-5's text)."""

from __future__ import annotations

import zarr
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v05.image import Image


def check_valid(uri: str, axes: tuple[str, ...]) -> None:
    model = open_ome_zarr(zarr.open_group(uri, mode="r"))
    assert isinstance(model, Image), type(model)
    (multiscale,) = model.ome_attributes.multiscales
    assert tuple(a.name for a in multiscale.axes) == axes
    group = zarr.open_group(uri, mode="r")
    for dataset in multiscale.datasets:
        assert group[dataset.path].metadata.dimension_names == axes




def check_axes(axes: list[dict]) -> None:
    """axes.schema: 1 to 5 named axes, unique names, 2 or 3 of type space."""
    assert 1 <= len(axes) <= 5
    names = [a["name"] for a in axes]
    assert all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names)
    assert 2 <= sum(a.get("type") == "space" for a in axes) <= 3
    for axis in axes:
        assert set(axis) <= {"name", "longName", "type", "discrete", "unit"}, axis
        assert isinstance(axis.get("discrete", False), bool)
        assert isinstance(axis.get("unit", ""), str)


def check_io(reference: dict, required: str) -> None:
    assert isinstance(reference, dict) and set(reference) <= {"name", "path"}, reference
    assert isinstance(reference.get(required), str) and reference[required], reference


def check_dataset_transform(transform: dict, path: str, systems: set[str], ndim: int) -> None:
    """image.schema: one scale, identity, or sequence of a scale then a translation, from
    the dataset (input.path) to a coordinate system of this multiscale (output.name)."""
    check_io(transform["input"], "path")
    check_io(transform["output"], "name")
    assert transform["input"]["path"] == path
    assert transform["output"]["name"] in systems
    if transform["type"] == "sequence":
        kinds = [t["type"] for t in transform["transformations"]]
        assert kinds == ["scale", "translation"], kinds
        assert len(transform["transformations"][0]["scale"]) == ndim
        assert len(transform["transformations"][1]["translation"]) == ndim
    else:
        assert transform["type"] in ("scale", "identity")


def check_displacement_field(uri: str, unit: str | None) -> None:
    group = zarr.open_group(uri, mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.6rc0"
    (multiscale,) = ome["multiscales"]
    assert {"datasets", "coordinateSystems"} <= set(multiscale) and "axes" not in multiscale
    systems = multiscale["coordinateSystems"]
    for system in systems:
        assert isinstance(system["name"], str) and system["name"]
        check_axes(system["axes"])
    axes = systems[0]["axes"]
    # RFC-5: the vector axis first, typed displacement, discrete; one component per
    # space axis, in the order of the space axes.
    assert axes[0] == {"name": "c", "type": "displacement", "discrete": True}
    space = [a for a in axes[1:]]
    assert [a["name"] for a in space] == ["z", "y", "x"]
    assert all(a["type"] == "space" and a.get("unit") == unit for a in space)
    names = {s["name"] for s in systems}
    assert len(multiscale["datasets"]) >= 1
    for dataset in multiscale["datasets"]:
        (transform,) = dataset["coordinateTransformations"]
        check_dataset_transform(transform, dataset["path"], names, len(axes))
        array = group[dataset["path"]]
        assert array.metadata.dimension_names == tuple(a["name"] for a in axes)
        assert array.shape[0] == len(space)
    assert group.attrs["dreg"]["kind"] == "displacement_field"


def check_scene(uri: str, bijection: bool, unit: str | None) -> None:
    """scene.schema: transformations between referenced coordinate systems. A reference
    without a `path` names a system the scene declares (0.6rc0, "scene" metadata): dreg's
    scene declares "fixed" and "moving" and records the images' URIs under ``dreg``."""
    attrs = zarr.open_group(uri, mode="r").attrs
    ome = attrs["ome"]
    assert ome["version"] == "0.6rc0"
    systems = {s["name"]: s for s in ome["scene"]["coordinateSystems"]}
    assert set(systems) == {"fixed", "moving"}
    for system in systems.values():
        check_axes(system["axes"])
        assert [(a["name"], a["type"], a.get("unit")) for a in system["axes"]] == [
            (n, "space", unit) for n in "zyx"]
    (transform,) = ome["scene"]["coordinateTransformations"]
    check_io(transform["input"], "name")
    check_io(transform["output"], "name")
    assert (transform["input"], transform["output"]) == ({"name": "fixed"}, {"name": "moving"})
    assert attrs["dreg"]["fixed"]["uri"] and attrs["dreg"]["moving"]["uri"]
    if bijection:
        assert transform["type"] == "bijection"
        parts = [transform["forward"], transform["inverse"]]
    else:
        assert transform["type"] == "displacements"
        parts = [transform]
    for part in parts:
        assert part["type"] == "displacements" and isinstance(part["path"], str)
        check_displacement_field(f"{uri}/{part['path']}", unit=unit)
