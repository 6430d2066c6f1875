"""What dreg writes is valid OME-Zarr: images (converted, synthetic) are 0.5 and open
with ome-zarr-models; displacement fields and OUT's scene follow NGFF RFC-5 as released in
0.6rc0. `check_displacement_field` and `check_scene` apply the rules of the 0.6rc0
schemas (axes, coordinate_systems, image, scene) and RFC-5's text by hand; the same
metadata is also validated with ngff-zarr's 0.6 schemas and v0.6 models."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr
from itk_samples import ITK_CASES, sample_array, write_with_itk
from ngff_checks import check_displacement_field, check_scene, check_valid

from dreg.io import convert

DREG = [sys.executable, "-m", "cli.main"]


@pytest.mark.full  # runs dreg convert as a process
@pytest.mark.parametrize("name", ["image.mha", "image.nii.gz", "image.nrrd"])
def test_converted_images_are_valid_ome_zarr_05(tmp_path, name):
    case = next(c for c in ITK_CASES if c[0] == name)
    path = tmp_path / name
    write_with_itk(path, sample_array(case[1]), compression=case[2])
    out = tmp_path / "out.ome.zarr"
    done = subprocess.run([*DREG, "convert", str(path), str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    check_valid(str(out), ("z", "y", "x"))


def test_a_converted_tiff_is_valid_ome_zarr_05(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.arange(20 * 30 * 40, dtype=np.uint16).reshape(20, 30, 40))
    image = convert.convert(path, tmp_path / "out.ome.zarr", chunks=16)
    check_valid(image.uri, ("z", "y", "x"))

def test_synthetic_pairs_are_valid_ome_zarr_05_and_their_truth_rfc5(tmp_path):
    done = subprocess.run([*DREG, "synth", str(tmp_path / "pair"), "--shape", "24,32,40"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    check_valid(str(tmp_path / "pair" / "fixed.ome.zarr"), ("z", "y", "x"))
    check_valid(str(tmp_path / "pair" / "moving.ome.zarr"), ("z", "y", "x"))
    check_displacement_field(str(tmp_path / "pair" / "truth.ome.zarr"), unit="micrometer")


def test_the_checker_rejects_what_rfc5_forbids(tmp_path):
    from dreg.grid import Grid
    from dreg.io import ome_zarr

    grid = Grid((4, 5, 6), (1.0, 1.0, 1.0))
    channel = ome_zarr.create_image(str(tmp_path / "c.ome.zarr"), [grid], "float32",
                                    components=3)
    with pytest.raises((AssertionError, KeyError)):
        check_displacement_field(channel.uri, unit=None)


# ngff-zarr (a test dependency) ships OME-Zarr 0.6 models (`ngff_zarr.v06`) and the 0.6
# JSON schemas: what dreg writes as 0.6 is validated with them too, next to the rules
# above. Imported in the tests, not at the top: other modules import the checks above.


def validate_field_with_ngff_zarr(uri: str) -> None:
    """ngff-zarr reads the field as a 0.6 multiscale: the 0.6 image schema, then its
    v0.6 models (coordinate systems, axes, the dataset transformations)."""
    import ngff_zarr
    from ngff_zarr.v06.zarr_metadata import Metadata, TransformSequence

    multiscales = ngff_zarr.from_ome_zarr(uri, validate=True)
    metadata = multiscales.metadata
    assert isinstance(metadata, Metadata), type(metadata)
    (system,) = metadata.coordinateSystems
    vector = system.axes[0]
    assert (vector.type, vector.discrete) == ("displacement", True)
    assert [(a.name, a.type) for a in system.axes[1:]] == [(n, "space") for n in "zyx"]
    for dataset in metadata.datasets:
        (transform,) = dataset.coordinateTransformations
        assert isinstance(transform, TransformSequence)
        assert [t.type for t in transform.transformations] == ["scale", "translation"]
        assert transform.output.name == system.name


def validate_scene_with_ngff_zarr(uri: str) -> None:
    """The scene against the 0.6 scene schema; each field it names (below the scene
    group) as a 0.6 displacement field."""
    import ngff_zarr

    attrs = dict(zarr.open_group(uri, mode="r").attrs)
    ngff_zarr.validate(attrs, version=attrs["ome"]["version"], model="scene")
    (transform,) = attrs["ome"]["scene"]["coordinateTransformations"]
    parts = ([transform["forward"], transform["inverse"]] if transform["type"] == "bijection"
             else [transform])
    for part in parts:
        assert part["type"] == "displacements"
        validate_field_with_ngff_zarr(f"{uri}/{part['path']}")


def scene_folder(tmp_path, pair: dict, inverse: bool) -> str:
    """OUT as a registration leaves it, for the scene: the field (and the inverse) under
    OUT, the images outside it."""
    import shutil

    from dreg.apply.scene import write_scene
    from dreg.layout import FIELD_NAME, INVERSE_NAME

    out = tmp_path / "out"
    for name in (FIELD_NAME, INVERSE_NAME) if inverse else (FIELD_NAME,):
        shutil.copytree(pair["truth"], out / name)
    write_scene(str(out), pair["fixed"], pair["moving"], inverse=inverse)
    return str(out)


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory):
    from dreg import synth
    from dreg.grid import Grid

    return synth.write_pair(str(tmp_path_factory.mktemp("pair") / "pair"),
                            Grid((12, 16, 20), (1.0, 1.0, 1.0)), seed=0)


def test_ngff_zarr_reads_dreg_fields_as_valid_ome_zarr_06(synthetic_pair, tmp_path):
    from dreg.field.displacement import create_field
    from dreg.grid import Grid

    validate_field_with_ngff_zarr(synthetic_pair["truth"])
    grid = Grid((6, 7, 8), (2.0, 1.5, 1.0), (3.0, -4.0, 5.0))
    created = create_field(str(tmp_path / "f.ome.zarr"), grid, chunks=4)
    validate_field_with_ngff_zarr(created.uri)
    check_displacement_field(created.uri, unit=None)


@pytest.mark.parametrize("inverse", [False, True])
def test_ngff_zarr_validates_the_scene(synthetic_pair, tmp_path, inverse):
    out = scene_folder(tmp_path, synthetic_pair, inverse)
    validate_scene_with_ngff_zarr(out)
    check_scene(out, bijection=inverse, unit="micrometer")


def test_ngff_zarr_rejects_what_the_06_schemas_forbid(synthetic_pair, tmp_path):
    import shutil

    from jsonschema import ValidationError

    uri = tmp_path / "bad.ome.zarr"
    shutil.copytree(synthetic_pair["truth"], uri)
    group = zarr.open_group(str(uri), mode="r+")
    ome = dict(group.attrs["ome"])
    ome["multiscales"][0]["coordinateSystems"][0]["axes"][0]["discrete"] = "yes"
    group.attrs["ome"] = ome
    with pytest.raises(ValidationError):
        validate_field_with_ngff_zarr(str(uri))


def test_ngff_zarr_reads_the_scene(synthetic_pair, tmp_path):
    """Issue 22 item 2: ngff-zarr's scene reader (validate=True runs its spec checks: every
    reference resolves, the graph is connected) reads OUT's scene. It refused the scene
    while the scene named the images by URIs outside OUT and a 'physical' system that
    their 0.5 metadata does not declare; the scene now declares "fixed" and "moving"."""
    import ngff_zarr

    scene = ngff_zarr.from_ome_zarr(scene_folder(tmp_path, synthetic_pair, True),
                                    kind="scene", validate=True)
    assert [s.name for s in scene.coordinateSystems] == ["fixed", "moving"]
    assert scene.images == {}
    (transform,) = scene.coordinateTransformations
    assert (transform.input.name, transform.output.name) == ("fixed", "moving")
    assert (transform.forward.path, transform.inverse.path) == ("field.ome.zarr",
                                                                "inverse.ome.zarr")
