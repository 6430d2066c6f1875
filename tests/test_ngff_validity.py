"""What dreg writes is OME-Zarr 0.5 that a maintained reader accepts: converted images,
synthetic pairs and displacement fields open with ome-zarr-models, and every array
carries dimension_names equal to its axes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v05.image import Image
from test_convert import ITK_CASES, sample_array, write_with_itk

from dreg.io import convert

DREG = [sys.executable, "-m", "flows.cli"]


def check_valid(uri: str, axes: tuple[str, ...]) -> None:
    model = open_ome_zarr(zarr.open_group(uri, mode="r"))
    assert isinstance(model, Image), type(model)
    (multiscale,) = model.ome_attributes.multiscales
    assert tuple(a.name for a in multiscale.axes) == axes
    group = zarr.open_group(uri, mode="r")
    for dataset in multiscale.datasets:
        assert group[dataset.path].metadata.dimension_names == axes


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


def test_synthetic_pairs_and_fields_are_valid_ome_zarr_05(tmp_path):
    done = subprocess.run([*DREG, "synth", str(tmp_path / "pair"), "--shape", "24,32,40"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    check_valid(str(tmp_path / "pair" / "fixed.ome.zarr"), ("z", "y", "x"))
    check_valid(str(tmp_path / "pair" / "moving.ome.zarr"), ("z", "y", "x"))
    check_valid(str(tmp_path / "pair" / "truth.ome.zarr"), ("c", "z", "y", "x"))
