"""OME-Zarr access: metadata round trips, region reads, vector images, 0.4/v2 reading,
pyramid values and fingerprints."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zarr
from scipy import ndimage

from dreg.errors import InputError
from dreg.grid import Grid
from dreg.io import ome_zarr, pyramid


def rotation(axis, degrees: float) -> tuple:
    """A proper rotation matrix about `axis` (Rodrigues), as nested tuples."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = np.radians(degrees)
    matrix = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    return tuple(tuple(row) for row in matrix)


ANISOTROPIC = Grid(
    shape_zyx=(21, 34, 47),
    spacing_xyz=(0.5, 0.75, 2.0),
    origin_xyz=(10.25, -5.5, 3.125),
    direction=rotation((1, 2, 3), 25),
)


def full(grid: Grid) -> tuple:
    return tuple(slice(0, n) for n in grid.shape_zyx)


def write_image(uri, grid, data, chunks=8, coarsest=8, components=None):
    """An image with `data` at level 0 and its pyramid built chunk by chunk."""
    grids = pyramid.pyramid_grids(grid, coarsest_longest_axis=coarsest)
    image = ome_zarr.create_image(uri, grids, data.dtype, chunks=chunks, components=components)
    ome_zarr.write_level_by_chunks(
        image, 0, lambda region: data[(slice(None),) * (data.ndim - 3) + region], workers=2
    )
    pyramid.build_pyramid(image, workers=2)
    return image


@pytest.mark.parametrize("dtype", ["float32", "uint16", "int8"])
def test_metadata_round_trip(tmp_path, dtype):
    uri = str(tmp_path / "image.ome.zarr")
    grids = pyramid.pyramid_grids(ANISOTROPIC, coarsest_longest_axis=8)
    ome_zarr.create_image(uri, grids, dtype, chunks=(4, 8, 16))

    image = ome_zarr.open_image(uri)

    assert image.ome_version == "0.5"
    assert image.components is None
    assert [lv.grid for lv in image.levels] == grids
    assert image.levels[0].grid == ANISOTROPIC  # spacing, origin, direction exactly
    assert [lv.dtype for lv in image.levels] == [dtype] * len(grids)
    assert image.levels[0].chunks_zyx == (4, 8, 16)
    # Levels halve the shape (rounding up), double the spacing, keep origin and direction.
    for finer, coarser in zip(image.levels, image.levels[1:], strict=False):
        assert coarser.grid.shape_zyx == tuple(-(-n // 2) for n in finer.grid.shape_zyx)
        assert coarser.grid.spacing_xyz == tuple(2 * s for s in finer.grid.spacing_xyz)
        assert coarser.grid.origin_xyz == finer.grid.origin_xyz
    assert max(image.levels[-1].grid.shape_zyx) <= 8 < max(image.levels[-2].grid.shape_zyx)


def test_region_read_equals_slice_of_full_array_at_every_level(tmp_path):
    data = np.random.default_rng(0).normal(100, 20, ANISOTROPIC.shape_zyx).astype(np.float32)
    image = write_image(str(tmp_path / "image.ome.zarr"), ANISOTROPIC, data)
    assert len(image.levels) == 4

    assert np.array_equal(ome_zarr.read_region(image, 0, full(ANISOTROPIC)), data)
    for level in range(len(image.levels)):
        grid = image.level(level).grid
        whole = ome_zarr.read_region(image, level, full(grid))
        assert whole.shape == grid.shape_zyx
        nz, ny, nx = grid.shape_zyx
        regions = [
            (slice(0, 1), slice(0, 1), slice(0, 1)),
            (slice(nz // 3, nz), slice(1, ny - 1), slice(nx // 2, nx)),  # crosses chunks
            (slice(nz - 1, nz), slice(0, ny), slice(nx - 3, nx)),  # touches the far border
        ]
        for region in regions:
            assert np.array_equal(ome_zarr.read_region(image, level, region), whole[region])


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_pyramid_level_is_smoothed_then_subsampled_previous_level(tmp_path, dtype):
    # Chunk by chunk with a halo must give what smoothing the whole level gives.
    rng = np.random.default_rng(1)
    data = rng.uniform(0, 250, ANISOTROPIC.shape_zyx).astype(dtype)
    image = write_image(str(tmp_path / "image.ome.zarr"), ANISOTROPIC, data)
    previous = data
    for level in range(1, len(image.levels)):
        expected = ndimage.gaussian_filter(previous.astype(np.float32), 1.0, mode="nearest")
        expected = expected[::2, ::2, ::2]
        if np.issubdtype(np.dtype(dtype), np.integer):
            expected = np.clip(np.rint(expected), 0, 255)
        expected = expected.astype(dtype)
        got = ome_zarr.read_region(image, level, full(image.level(level).grid))
        assert np.array_equal(got, expected), f"level {level}"
        previous = got


def test_vector_image_round_trip(tmp_path):
    grid = Grid((12, 17, 22), (1.5, 1.0, 0.5), (1, 2, 3), rotation((0, 0, 1), 90))
    data = np.random.default_rng(2).normal(size=(3, *grid.shape_zyx)).astype(np.float32)
    uri = str(tmp_path / "vector.ome.zarr")
    write_image(uri, grid, data, chunks=8, components=3)

    reopened = ome_zarr.open_image(uri)
    assert reopened.components == 3
    assert reopened.levels[0].grid == grid
    region = (slice(3, 12), slice(5, 6), slice(0, 22))
    assert np.array_equal(ome_zarr.read_region(reopened, 0, region), data[(slice(None), *region)])
    coarse = ome_zarr.read_region(reopened, 1, full(reopened.level(1).grid))
    assert coarse.shape == (3, 6, 9, 11)
    # Components are smoothed separately, never mixed.
    expected = ndimage.gaussian_filter(data[1], 1.0, mode="nearest")[::2, ::2, ::2]
    assert np.array_equal(coarse[1], expected)
    with pytest.raises(InputError, match="needs a scalar 3D image"):
        ome_zarr.open_image(uri, require_scalar=True)


def write_v2_image(path, levels, axes, multiscale_transforms=None):
    """An OME-Zarr 0.4 image on zarr v2, metadata written by hand as other tools do."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for k, (data, scale, translation) in enumerate(levels):
        array = root.create_array(str(k), shape=data.shape, chunks=(5,) * data.ndim,
                                  dtype=data.dtype)
        array[...] = data
        datasets.append({
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": scale},
                {"type": "translation", "translation": translation},
            ],
        })
    multiscale = {
        "version": "0.4",
        "name": "v2",
        "axes": [{"name": a, "type": "channel" if a == "c" else "space"} for a in axes],
        "datasets": datasets,
    }
    if multiscale_transforms:
        multiscale["coordinateTransformations"] = multiscale_transforms
    root.attrs["multiscales"] = [multiscale]


def test_reads_ome_zarr_04_on_zarr_v2(tmp_path):
    rng = np.random.default_rng(3)
    fine = rng.integers(0, 4000, (9, 11, 13)).astype(np.uint16)
    coarse = fine[::2, ::2, ::2].copy()
    path = tmp_path / "v04.zarr"
    write_v2_image(path, [(fine, [2.0, 0.75, 0.5], [3.0, -1.0, 7.5]),
                          (coarse, [4.0, 1.5, 1.0], [3.0, -1.0, 7.5])], "zyx")
    assert (path / ".zgroup").exists() and not (path / "zarr.json").exists()

    image = ome_zarr.open_image(str(path))

    assert image.ome_version == "0.4"
    assert image.levels[0].grid == Grid((9, 11, 13), (0.5, 0.75, 2.0), (7.5, -1.0, 3.0))
    assert image.levels[1].grid.spacing_xyz == (1.0, 1.5, 4.0)
    assert image.levels[0].dtype == "uint16"
    assert image.levels[0].chunks_zyx == (5, 5, 5)
    region = (slice(2, 9), slice(4, 10), slice(0, 6))
    assert np.array_equal(ome_zarr.read_region(image, 0, region), fine[region])
    assert np.array_equal(ome_zarr.read_region(image, 1, full(image.levels[1].grid)), coarse)


def test_reads_04_vector_image_with_multiscale_level_transforms(tmp_path):
    data = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    path = tmp_path / "v04c.zarr"
    # Dataset transforms come first, then the multiscale's shared ones.
    shared = [{"type": "scale", "scale": [1.0, 2.0, 2.0, 2.0]},
              {"type": "translation", "translation": [0.0, 10.0, 20.0, 30.0]}]
    write_v2_image(path, [(data, [1.0, 1.0, 0.5, 0.25], [0.0, 1.0, 1.0, 1.0])], "czyx", shared)

    image = ome_zarr.open_image(str(path))

    assert image.components == 2
    grid = image.levels[0].grid
    assert grid.spacing_xyz == (0.5, 1.0, 2.0)
    assert grid.origin_xyz == (32.0, 22.0, 12.0)
    assert np.array_equal(ome_zarr.read_region(image, 0, full(grid)), data)


def test_fingerprint_changes_when_a_chunk_is_rewritten(tmp_path):
    grid = Grid((16, 16, 16), (1.0, 1.0, 1.0))
    data = np.random.default_rng(4).normal(size=grid.shape_zyx).astype(np.float32)
    image = write_image(str(tmp_path / "image.ome.zarr"), grid, data, coarsest=8)
    first = ome_zarr.fingerprint(image)
    first_coarse = ome_zarr.fingerprint(image, levels=[1])
    assert ome_zarr.fingerprint(ome_zarr.open_image(image.uri)) == first  # stable

    chunk = (slice(8, 16), slice(0, 8), slice(8, 16))
    ome_zarr.write_region(image, 0, chunk, data[chunk] + 1)
    second = ome_zarr.fingerprint(image)
    assert second != first

    time.sleep(0.01)  # same bytes again: only the modification time differs
    ome_zarr.write_region(image, 0, chunk, data[chunk] + 1)
    assert ome_zarr.fingerprint(image) != second
    # A fingerprint of level 1 only does not see level 0's chunks.
    assert ome_zarr.fingerprint(image, levels=[1]) == first_coarse


def test_create_refuses_to_replace_without_overwrite(tmp_path):
    uri = str(tmp_path / "image.ome.zarr")
    grid = Grid((4, 4, 4), (1, 1, 1))
    ome_zarr.create_image(uri, [grid], "float32")
    with pytest.raises(InputError, match="already exists"):
        ome_zarr.create_image(uri, [grid], "float32")
    ome_zarr.create_image(uri, [grid], "uint8", overwrite=True)
    assert ome_zarr.open_image(uri).levels[0].dtype == "uint8"


def test_levels_that_are_not_valid_ome_zarr_05_are_refused_before_anything_is_written(
        tmp_path):
    """ome-zarr-models validates the metadata as it is built: here a second level finer
    than the first."""
    fine, coarse = Grid((8, 8, 8), (1.0, 1.0, 1.0)), Grid((4, 4, 4), (2.0, 2.0, 2.0))
    uri = tmp_path / "i.ome.zarr"
    with pytest.raises(InputError, match=r"i\.ome\.zarr: the levels do not make a valid "
                       r"OME-Zarr image \(.*lower resolution"):
        ome_zarr.create_image(str(uri), [coarse, fine], "float32")
    assert not uri.exists()


def test_an_undecodable_chunk_is_named_by_image_level_and_chunk(tmp_path):
    from pathlib import Path

    from dreg.errors import StorageError

    grid = Grid((32, 32, 32), (1.0, 1.0, 1.0))
    image = ome_zarr.create_image(str(tmp_path / "i.ome.zarr"), [grid], "float32", chunks=16)
    whole_box = (slice(0, 32),) * 3
    ome_zarr.write_region(image, 0, whole_box, np.ones((32, 32, 32), dtype=np.float32))
    Path(tmp_path, "i.ome.zarr/0/c/1/0/1").write_bytes(b"not a chunk" * 8)
    with pytest.raises(StorageError) as caught:
        ome_zarr.read_region(image, 0, whole_box)
    message = str(caught.value)
    assert message.startswith(f"{image.uri}: level 0 (array '0'), chunk (1, 0, 1) (z, y, x)")
    assert len(message.splitlines()) == 1
    # A region that avoids the bad chunk still reads.
    assert ome_zarr.read_region(image, 0, (slice(0, 16),) * 3).sum() == 16**3


# ----------------------------------------------------------------------------- integrity


def flip_one_byte(path) -> None:
    """Corrupt a stored chunk the way a bad disk or a partial copy does: one bit."""
    from pathlib import Path

    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))


def chunk_file(image: ome_zarr.OmeZarrImage, level: int, key: tuple) -> str:
    return "/".join([image.uri, image.levels[level].path, "c", *map(str, key)])


@pytest.mark.parametrize("level", [0, 1])
def test_a_flipped_byte_in_an_image_chunk_is_an_error_naming_image_level_and_chunk(
        tmp_path, level):
    from dreg.errors import StorageError

    grid = Grid((32, 32, 32), (1.0, 1.0, 1.0))
    data = np.random.default_rng(0).random((32, 32, 32), dtype=np.float32)
    image = write_image(str(tmp_path / "i.ome.zarr"), grid, data, chunks=8, coarsest=8)
    whole = full(image.levels[level].grid)
    before = ome_zarr.read_region(image, level, whole)
    flip_one_byte(chunk_file(image, level, (1, 0, 1)))
    with pytest.raises(StorageError) as caught:
        ome_zarr.read_region(image, level, whole)
    message = str(caught.value)
    assert message == (f"{image.uri}: level {level} (array '{level}'), chunk (1, 0, 1) "
                       "(z, y, x) corrupt (its crc32c checksum does not match its bytes)")
    # The other chunks still read, unchanged.
    np.testing.assert_array_equal(
        ome_zarr.read_region(image, level, (slice(0, 8),) * 3), before[:8, :8, :8])


def test_a_flipped_byte_in_an_uncompressed_field_chunk_is_an_error(tmp_path):
    from dreg.errors import StorageError
    from dreg.field.displacement import create_field, open_field, sample_field

    grid = Grid((16, 24, 32), (2.0, 1.5, 1.0))
    field = create_field(str(tmp_path / "f.ome.zarr"), grid, chunks=8)
    values = np.random.default_rng(1).normal(size=(3, 16, 24, 32)).astype(np.float32)
    ome_zarr.write_region(field, 0, full(grid), values)
    codecs = zarr.open_array(str(tmp_path / "f.ome.zarr/0"), mode="r").metadata.codecs
    assert [c.to_dict()["name"] for c in codecs] == ["bytes", "crc32c"]  # raw, checksummed
    flip_one_byte(chunk_file(field, 0, (0, 1, 2, 3)))
    with pytest.raises(StorageError, match=r"f\.ome\.zarr: level 0 \(array '0'\), chunk "
                       r"\(1, 2, 3\) \(z, y, x\) corrupt"):
        sample_field(open_field(field.uri), grid.region_points(full(grid)))


def test_images_written_without_checksums_still_read(tmp_path):
    """Images from older versions (zstd only) and from other tools (no codec at all)."""
    grid = Grid((16, 16, 16), (1.0, 1.0, 1.0))
    data = np.arange(16**3, dtype=np.float32).reshape(16, 16, 16)
    for name, compressors in (("zstd", "auto"), ("raw", None)):
        uri = str(tmp_path / f"{name}.ome.zarr")
        group = zarr.open_group(uri, mode="w", zarr_format=3)
        group.create_array("0", shape=data.shape, chunks=(8, 8, 8), dtype="float32",
                           compressors=compressors, dimension_names=("z", "y", "x"))[:] = data
        group.attrs.update(ome_zarr._ngff_attrs([grid], None, name, None))
        image = ome_zarr.open_image(uri)
        np.testing.assert_array_equal(ome_zarr.read_region(image, 0, full(grid)), data)
@pytest.mark.parametrize("compressed", [False, True])
def test_chunks_of_only_the_fill_value_are_stored_by_raw_arrays_only(tmp_path, compressed):
    grid = Grid((8, 8, 8), (1.0, 1.0, 1.0))
    uri = str(tmp_path / "i.ome.zarr")
    image = ome_zarr.create_image(uri, [grid], "float32", chunks=4, compressed=compressed)
    values = np.zeros(grid.shape_zyx, np.float32)
    values[4:, 4:, 4:] = 1.0
    whole = tuple(slice(0, 8) for _ in range(3))
    ome_zarr.write_region(image, 0, whole, values)
    stored = sorted(p for p in (tmp_path / "i.ome.zarr" / "0" / "c").rglob("*") if p.is_file())
    assert len(stored) == (1 if compressed else 8)
    np.testing.assert_array_equal(ome_zarr.read_region(image, 0, whole), values)
