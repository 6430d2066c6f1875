"""`dreg convert`: every format to OME-Zarr with exact voxels, geometry and pyramid."""

from __future__ import annotations

import itk
import numpy as np
import pytest
import tifffile
from itk_samples import (
    DIRECTION,
    ITK_CASES,
    ORIGIN_XYZ,
    SHAPE_ZYX,
    SPACING_XYZ,
    sample_array,
    write_with_itk,
)
from scipy import ndimage

from dreg.errors import InputError
from dreg.io import convert, ome_zarr


def check_pyramid(image: ome_zarr.OmeZarrImage, level0: np.ndarray) -> None:
    """Shapes halve (rounding up) to a longest axis <= 64; values are the smoothed,
    subsampled previous level, rounded back for integers."""
    shapes = [lv.grid.shape_zyx for lv in image.levels]
    assert shapes == [(40, 50, 150), (20, 25, 75), (10, 13, 38)]
    assert max(shapes[-1]) <= 64 < max(shapes[-2])
    previous = level0
    for k in range(1, len(image.levels)):
        grid = image.level(k).grid
        assert grid.spacing_xyz == tuple(s * 2**k for s in image.levels[0].grid.spacing_xyz)
        assert grid.origin_xyz == image.levels[0].grid.origin_xyz
        expected = ndimage.gaussian_filter(previous.astype(np.float32), 1.0, mode="nearest")
        expected = expected[::2, ::2, ::2]
        if np.issubdtype(level0.dtype, np.integer):
            info = np.iinfo(level0.dtype)
            expected = np.clip(np.rint(expected), info.min, info.max)
        got = ome_zarr.read_region(image, k, tuple(slice(0, n) for n in grid.shape_zyx))
        assert got.dtype == level0.dtype
        assert np.array_equal(got, expected.astype(level0.dtype)), f"level {k}"
        previous = got


def read_level0(image: ome_zarr.OmeZarrImage) -> np.ndarray:
    return ome_zarr.read_region(image, 0, tuple(slice(0, n) for n in SHAPE_ZYX))


@pytest.mark.parametrize("box_bytes", [convert.BOX_BYTES, 20_000], ids=["boxes", "chunks"])
@pytest.mark.parametrize(("name", "dtype", "compression", "reader", "tolerance"), ITK_CASES,
                         ids=[c[0] for c in ITK_CASES])
def test_convert_itk_formats(tmp_path, monkeypatch, box_bytes, name, dtype, compression,
                             reader, tolerance):
    # A small box budget makes every box a single chunk: reads start mid-row and mid-slab.
    monkeypatch.setattr(convert, "BOX_BYTES", box_bytes)
    array = sample_array(dtype)
    path = tmp_path / name
    write_with_itk(path, array, compression)

    source = convert.open_source(path)
    source.close()
    assert source.method == reader
    image = convert.convert(path, str(tmp_path / "out.ome.zarr"), chunks=16)

    reopened = ome_zarr.open_image(image.uri)
    grid = reopened.levels[0].grid
    level0 = read_level0(reopened)
    assert level0.dtype == np.dtype(dtype)
    assert np.array_equal(level0, array)
    # Exactly the geometry ITK reads from the file...
    from_itk = itk.imread(str(path))
    assert grid.spacing_xyz == tuple(from_itk.GetSpacing())
    assert grid.origin_xyz == tuple(from_itk.GetOrigin())
    assert grid.direction_matrix.tolist() == itk.array_from_matrix(
        from_itk.GetDirection()).tolist()
    # ...which is the original up to what the format rounds (NRRD stores spacing times
    # direction, NIfTI a float32 quaternion).
    np.testing.assert_allclose(grid.spacing_xyz, SPACING_XYZ, rtol=1e-15)
    np.testing.assert_allclose(grid.origin_xyz, ORIGIN_XYZ, rtol=1e-15)
    np.testing.assert_allclose(grid.direction_matrix, DIRECTION, rtol=0, atol=tolerance)
    assert reopened.levels[0].chunks_zyx == (16, 16, 16)
    check_pyramid(reopened, level0)


def test_convert_imagej_tiff_keeps_spacing(tmp_path):
    array = sample_array("uint16")
    path = tmp_path / "stack.tif"
    # ImageJ stores x/y as pixels per unit and z spacing in its description.
    tifffile.imwrite(path, array, imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                     metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})

    image = convert.convert(path, str(tmp_path / "out.ome.zarr"), chunks=16)

    grid = image.levels[0].grid
    assert (grid.spacing_xyz, grid.origin_xyz) == ((0.5, 0.25, 2.0), (0.0, 0.0, 0.0))
    assert grid.direction_matrix.tolist() == np.eye(3).tolist()
    level0 = read_level0(ome_zarr.open_image(image.uri))
    assert np.array_equal(level0, array)
    check_pyramid(image, level0)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_convert_ome_tiff_keeps_spacing(tmp_path, monkeypatch, compression):
    monkeypatch.setattr(convert, "BOX_BYTES", 20_000)
    array = sample_array("float32")
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, array, ome=True, compression=compression, metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.75, "PhysicalSizeZ": 1.25})

    image = convert.convert(path, str(tmp_path / "out.ome.zarr"), chunks=16)

    assert image.levels[0].grid.spacing_xyz == SPACING_XYZ
    level0 = read_level0(ome_zarr.open_image(image.uri))
    assert np.array_equal(level0, array)
    check_pyramid(image, level0)


def write_mha_by_hand(path, array, element_type: str) -> None:
    """A MetaImage file written directly: voxel types ITK's Python wrapping cannot write."""
    nz, ny, nx = array.shape
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\n"
        f"ElementSpacing = 1 1 1\nDimSize = {nx} {ny} {nz}\nElementType = {element_type}\n"
        "ElementDataFile = LOCAL\n"
    )
    with open(path, "wb") as handle:
        handle.write(header.encode())
        handle.write(array.astype(array.dtype.newbyteorder("<")).tobytes())


@pytest.mark.parametrize(("dtype", "element_type"), [
    ("int8", "MET_CHAR"), ("uint32", "MET_UINT"), ("int32", "MET_INT"),
])
def test_integer_types_without_itk_python_pipelines_are_kept(tmp_path, dtype, element_type):
    array = sample_array(dtype)
    path = tmp_path / "image.mha"
    write_mha_by_hand(path, array, element_type)

    image = convert.convert(path, str(tmp_path / "out.ome.zarr"), chunks=32)

    assert image.levels[0].dtype == dtype
    assert np.array_equal(read_level0(image), array)


def test_boxes_cover_the_grid_once_in_whole_chunks():
    shape, chunks = (37, 50, 70), (8, 16, 16)
    for budget in (1, 8 * 16 * 70 * 4, 8 * 50 * 70 * 4, 10**9):
        seen = np.zeros(shape, dtype=int)
        for box in convert.boxes(shape, chunks, 4, budget):
            seen[box] += 1
            for s, c, n in zip(box, chunks, shape, strict=True):
                assert s.start % c == 0 and (s.stop % c == 0 or s.stop == n)
            size = np.prod([s.stop - s.start for s in box]) * 4
            assert size <= max(budget, np.prod(chunks) * 4)
        assert (seen == 1).all()


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.mha", None, "no such file"),
    ("notes.txt", b"hello", "unsupported format"),
    ("junk.mha", b"hello", "unreadable image header"),
    ("junk.tif", b"hello", "unreadable TIFF"),
])
def test_bad_inputs_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as caught:
        convert.convert(path, str(tmp_path / "out.ome.zarr"))
    assert str(caught.value).startswith(str(path))
    assert not (tmp_path / "out.ome.zarr").exists()


@pytest.mark.parametrize(("array", "kwargs", "message"), [
    (np.zeros((5, 6), np.float32), {}, "needs a 3D image; it has 2 dimensions"),
    (np.zeros((2, 3, 5, 6), np.float32), {}, "needs a 3D image; it has 4 dimensions"),
    (np.zeros((3, 5, 6, 3), np.uint8), {"is_vector": True}, "3 components per voxel"),
])
def test_not_a_scalar_3d_image(tmp_path, array, kwargs, message):
    path = tmp_path / "image.nii"
    itk.imwrite(itk.image_from_array(array, **kwargs), str(path))
    with pytest.raises(InputError, match=message):
        convert.convert(path, str(tmp_path / "out.ome.zarr"))


@pytest.mark.parametrize("name", ["image.nii", "image.nii.gz", "image.mha"])
def test_truncated_file_fails_and_leaves_no_output(tmp_path, name):
    # ITK's NIfTI reader would fill the missing part with zeros without a word.
    full = tmp_path / f"full-{name}"
    write_with_itk(full, sample_array("int16"))
    truncated = tmp_path / name
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])

    with pytest.raises(InputError, match="truncated|cannot read voxels") as caught:
        convert.convert(truncated, str(tmp_path / "out.ome.zarr"))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out.ome.zarr").exists()


def test_existing_output_needs_overwrite(tmp_path):
    path = tmp_path / "image.mha"
    write_with_itk(path, sample_array("uint8"))
    out = str(tmp_path / "out.ome.zarr")
    convert.convert(path, out)
    with pytest.raises(InputError, match="already exists"):
        convert.convert(path, out)
    convert.convert(path, out, chunks=32, overwrite=True)
    assert ome_zarr.open_image(out).levels[0].chunks_zyx == (32, 32, 32)
