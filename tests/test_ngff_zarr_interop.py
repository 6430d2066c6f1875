"""Issue 22 item 2: ngff-zarr, the reference implementation of OME-Zarr 0.6 (RFC-5) fields
in Python, reads what a registration leaves in OUT: the field, the inverse and OUT's
scene, through its public readers and v0.6 models (not our own parsing), and its
streaming `resample` applies our field (and our inverse where it is defined) as
`dreg warp` does.

OUT is made without a registration: the synthetic pair's exact field is OUT's field
(tests/helpers.finished_registration), the inverse is computed in-process, and the scene
is written as the registration and invert flows write it.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest
from helpers import finished_registration

from dreg.apply import invert, warp
from dreg.apply.scene import write_scene
from dreg.field import open_field
from dreg.field.displacement import FIXED_TO_MOVING, MOVING_TO_FIXED
from dreg.grid import region_from_bounds, whole_region, xyz_to_zyx
from dreg.io import ome_zarr, storage
from dreg.layout import FIELD_NAME, INVERSE_NAME

# The inverse's chunk edge here. ngff-zarr's resample bounds a field's displacement per
# chunk (min and max over the chunk), so one NaN anywhere in a chunk stops it (see the
# xfail below); with small chunks the inner chunks of the inverse hold none.
INVERSE_CHUNK = 8
# A box of the moving grid whose inverse, and the chunks next to it, hold no NaN.
INVERSE_BOX = ((9, 9, 9), (15, 15, 15))


@pytest.fixture(scope="module")
def out(pair, tmp_path_factory) -> str:
    """OUT with its field, its inverse and the scene (a bijection)."""
    out = finished_registration(pair, str(tmp_path_factory.mktemp("interop") / "out"))
    field_uri = storage.join(out, FIELD_NAME)
    inverse_uri = storage.join(out, INVERSE_NAME)
    moving_grid = ome_zarr.open_image(pair["moving"]).levels[0].grid
    invert.create_inverse(inverse_uri, open_field(field_uri), moving_grid, pair["moving"],
                          chunks=INVERSE_CHUNK)
    invert.invert_chunk(field_uri, inverse_uri, whole_region(moving_grid.shape_zyx))
    write_scene(out, pair["fixed"], pair["moving"], inverse=True)
    return out


def whole(image: ome_zarr.OmeZarrImage) -> np.ndarray:
    return ome_zarr.read_region(image, 0, whole_region(image.levels[0].grid.shape_zyx))


def scene_fields(out: str) -> tuple[object, dict]:
    """OUT's scene as ngff-zarr reads it, and the fields its transformations name, read
    by ngff-zarr from the paths the scene gives (below OUT)."""
    import ngff_zarr

    scene = ngff_zarr.from_ome_zarr(out, kind="scene", validate=True)
    (transform,) = scene.coordinateTransformations
    paths = [transform.forward.path, transform.inverse.path]
    return scene, {p: ngff_zarr.from_ome_zarr(storage.join(out, p), validate=True)
                   for p in paths}


@pytest.mark.parametrize(("name", "mapping"), [(FIELD_NAME, FIXED_TO_MOVING),
                                               (INVERSE_NAME, MOVING_TO_FIXED)])
def test_ngff_zarr_reads_our_field_and_inverse(out, name, mapping):
    """Issue 22 item 2: the 0.6 image schema and the v0.6 models accept the field and the
    inverse; the coordinate system is named, its first axis is the displacement vector
    axis, the level's array is found at its path with our grid and our values (NaN where
    the inverse has no preimage)."""
    import ngff_zarr
    from ngff_zarr.v06.zarr_metadata import Metadata, TransformSequence

    ours = open_field(storage.join(out, name), mapping=mapping)
    grid = ours.levels[0].grid
    multiscales = ngff_zarr.from_ome_zarr(ours.uri, validate=True)
    metadata = multiscales.metadata
    assert isinstance(metadata, Metadata), type(metadata)
    (system,) = metadata.coordinateSystems
    assert system.name == "physical"
    assert [(a.name, a.type, a.discrete, a.unit) for a in system.axes] == [
        ("c", "displacement", True, None), *[(n, "space", None, "micrometer") for n in "zyx"]]
    (dataset,) = metadata.datasets
    (transform,) = dataset.coordinateTransformations
    assert isinstance(transform, TransformSequence)
    assert (transform.input.path, transform.output.name) == (dataset.path, system.name)

    (image,) = multiscales.images
    assert list(image.dims) == ["c", "z", "y", "x"]
    assert image.axes_types == {"c": "displacement"}
    assert image.data.shape == (3, *grid.shape_zyx)
    assert [image.scale[d] for d in "zyx"] == pytest.approx(xyz_to_zyx(grid.spacing_xyz))
    assert [image.translation[d] for d in "zyx"] == pytest.approx(xyz_to_zyx(grid.origin_xyz))
    np.testing.assert_array_equal(np.asarray(image.data), whole(ours))
    if mapping == MOVING_TO_FIXED:
        assert np.isnan(np.asarray(image.data)).any()


def test_ngff_zarr_reads_our_scene_and_finds_its_fields(out):
    """Issue 22 item 2: ngff-zarr's scene reader (with its spec checks) reads OUT's scene;
    its two coordinate systems are named, the bijection goes fixed -> moving, and each
    field it names is found below OUT and fits the systems it joins as RFC-5 requires:
    one vector component per input axis, component i along output axis i, the same
    unit; the forward field is ours fixed -> moving, the inverse ours moving -> fixed."""
    scene, fields = scene_fields(out)
    systems = {s.name: s for s in scene.coordinateSystems}
    assert list(systems) == ["fixed", "moving"]
    (transform,) = scene.coordinateTransformations
    assert transform.type == "bijection"
    assert (transform.input.name, transform.input.path) == ("fixed", None)
    assert (transform.output.name, transform.output.path) == ("moving", None)
    assert [transform.forward.type, transform.inverse.type] == ["displacements"] * 2
    assert (transform.forward.path, transform.inverse.path) == (FIELD_NAME, INVERSE_NAME)
    for part, mapping, source in ((transform.forward, FIXED_TO_MOVING, "fixed"),
                                  (transform.inverse, MOVING_TO_FIXED, "moving")):
        (image,) = fields[part.path].images
        axes = systems[source].axes
        assert image.data.shape[0] == len(axes)
        assert list(image.dims[1:]) == [a.name for a in axes]
        assert all(image.axes_units[a.name] == a.unit for a in axes)
        assert open_field(storage.join(out, part.path), mapping=mapping)


def test_ngff_zarr_reads_the_scene_before_the_inverse_exists(pair, tmp_path):
    """Issue 22 item 2: before `dreg invert`, the scene is one displacements transform
    whose own input and output name the two systems."""
    import ngff_zarr

    out = finished_registration(pair, str(tmp_path / "out"))
    write_scene(out, pair["fixed"], pair["moving"])
    scene = ngff_zarr.from_ome_zarr(out, kind="scene", validate=True)
    (transform,) = scene.coordinateTransformations
    assert (transform.type, transform.path) == ("displacements", FIELD_NAME)
    assert (transform.input.name, transform.output.name) == ("fixed", "moving")


def ngff_image(uri: str, box: tuple | None = None):
    """Level 0 of an image as ngff-zarr reads it, or the part of it in `box` (a crop
    keeps its place in space: the translation moves to the box's first voxel)."""
    from dataclasses import replace

    import ngff_zarr

    image = ngff_zarr.from_ome_zarr(uri).images[0]
    if box is None:
        return image
    lo, hi = box
    return replace(image, data=image.data[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))],
                   translation={d: image.translation[d] + lo[k] * image.scale[d]
                                for k, d in enumerate(image.dims)})


def resample_with_ngff_zarr(part, fields: dict, onto, image) -> np.ndarray:
    import ngff_zarr

    # One thread: ngff-zarr resamples through itk-wasm, which each thread would load anew.
    with dask.config.set(scheduler="synchronous"):
        resampled = ngff_zarr.resample(part, onto, image, fields=fields)
        return np.asarray(resampled.data.compute())


def test_ngff_zarr_resample_through_our_field_matches_dreg_warp(pair, out):
    """Issue 22 item 2: ngff-zarr's `resample`, given the scene's forward transform and
    the field it names, resamples the moving image onto the fixed grid as `dreg warp`
    does wherever the point x + u(x) lies within the moving image's voxel centres.
    Within half a voxel beyond them ITK (which ngff-zarr resamples with) still counts a
    point inside and extrapolates, where dreg gives 0: there the two differ, by design."""
    scene, fields = scene_fields(out)
    forward = scene.coordinateTransformations[0].forward
    theirs = resample_with_ngff_zarr(forward, fields, ngff_image(pair["fixed"]),
                                     ngff_image(pair["moving"]))

    field = open_field(storage.join(out, FIELD_NAME))
    moving = ome_zarr.open_image(pair["moving"])
    grid = warp.fixed_grid_of(field)
    ours = warp.warp_region(field, moving, 0, grid, whole_region(grid.shape_zyx), "linear")
    assert theirs.shape == ours.shape and theirs.dtype == ours.dtype

    index = warp.source_indices(field, moving.levels[0].grid, grid,
                                whole_region(grid.shape_zyx))
    shape = np.asarray(moving.levels[0].grid.shape_zyx)
    tolerance = warp.OUTSIDE_TOLERANCE
    inside = ((index >= -tolerance) & (index <= shape - 1 + tolerance)).all(axis=-1)
    assert 0.7 < inside.mean() < 1.0  # the shift moves part of the fixed grid off the image
    scale = np.abs(ours).max()
    np.testing.assert_allclose(theirs[inside], ours[inside], rtol=0, atol=1e-5 * scale)
    itk_inside = ((index >= -0.5) & (index < shape - 0.5)).all(axis=-1)
    assert (ours[~inside] == 0).all() and (theirs[~itk_inside] == 0).all()
    assert np.abs(theirs[itk_inside & ~inside]).max() > 0.1 * scale


def test_ngff_zarr_resample_through_our_inverse_matches_dreg_warp(pair, out):
    """Issue 22 item 2: through the scene's inverse, ngff-zarr resamples the fixed image
    onto a box of the moving grid as `dreg warp` does with the inverse field, on a box
    whose inverse chunks hold no NaN (see the xfail below)."""
    scene, fields = scene_fields(out)
    inverse = scene.coordinateTransformations[0].inverse
    theirs = resample_with_ngff_zarr(inverse, fields, ngff_image(pair["moving"], INVERSE_BOX),
                                     ngff_image(pair["fixed"]))

    field = open_field(storage.join(out, INVERSE_NAME), mapping=MOVING_TO_FIXED)
    ours = warp.warp_region(field, ome_zarr.open_image(pair["fixed"]), 0,
                            field.levels[0].grid, region_from_bounds(*INVERSE_BOX), "linear")
    assert (ours != 0).all()  # the box maps inside the fixed image
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5 * np.abs(ours).max())


@pytest.mark.xfail(strict=True, raises=ValueError, reason=(
    "ngff-zarr 0.50's resample bounds a field's displacement per chunk with min and max; "
    "a NaN in a chunk makes the bound NaN (resample_bounding_box.py, _grown: 'cannot "
    "convert float NaN to integer'). dreg's inverse is NaN where a moving point has no "
    "preimage in the fixed domain (DESIGN.md); RFC-5 says nothing of undefined values"))
def test_ngff_zarr_resamples_through_the_whole_inverse(pair, out):
    """Issue 22 item 2: the limit of the test above, on the whole moving grid."""
    scene, fields = scene_fields(out)
    inverse = scene.coordinateTransformations[0].inverse
    resample_with_ngff_zarr(inverse, fields, ngff_image(pair["moving"]),
                            ngff_image(pair["fixed"]))
