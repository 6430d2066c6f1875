"""Reading boxes of raw local arrays by mapping chunk files gives what zarr gives."""

from __future__ import annotations

import numpy as np
import pytest

from dreg import field
from dreg.errors import StorageError
from dreg.grid import Grid
from dreg.io import mapped, ome_zarr

GRID = Grid((21, 18, 25), (1.0, 1.0, 1.0))


def random_boxes(rng, shape, count=40):
    for _ in range(count):
        start = [int(rng.integers(0, n)) for n in shape]
        yield tuple(slice(a, int(rng.integers(a + 1, n + 1)))
                    for a, n in zip(start, shape, strict=True))


def test_a_raw_field_reads_the_same_mapped_as_through_zarr(tmp_path):
    rng = np.random.default_rng(0)
    image = field.create_field(str(tmp_path / "f.ome.zarr"), GRID, chunks=(8, 5, 7))
    values = rng.normal(size=(3, *GRID.shape_zyx)).astype(np.float32)
    # Part of the field written: the rest is never-written chunks, read as the fill value.
    part = (slice(0, 13), slice(0, 18), slice(6, 25))
    ome_zarr.write_region(image, 0, part, values[(slice(None), *part)])
    assert not (tmp_path / "f.ome.zarr" / "0" / "c" / "0" / "2").exists()  # z from 16
    for box in [tuple(slice(0, n) for n in GRID.shape_zyx), *random_boxes(rng, GRID.shape_zyx)]:
        np.testing.assert_array_equal(mapped.read_region(image, 0, box),
                                      ome_zarr.read_region(image, 0, box))


def test_a_big_endian_raw_array_is_read_in_its_byte_order(tmp_path):
    uri = str(tmp_path / "big.ome.zarr")
    image = ome_zarr.create_image(uri, [GRID], ">f4", chunks=6, compressed=False)
    values = np.arange(np.prod(GRID.shape_zyx), dtype=np.float32).reshape(GRID.shape_zyx)
    whole = tuple(slice(0, n) for n in GRID.shape_zyx)
    ome_zarr.write_region(image, 0, whole, values)
    box = (slice(3, 17), slice(2, 9), slice(5, 24))
    np.testing.assert_array_equal(mapped.read_region(image, 0, box), values[box])


def test_a_checksummed_raw_field_is_mapped_and_a_flipped_byte_is_named(tmp_path):
    image = field.create_field(str(tmp_path / "f.ome.zarr"), GRID, chunks=(8, 5, 7))
    codecs = [c.get("name") for c in
              mapped._raw_metadata(image, 0).to_dict()["codecs"]]  # mapped, checksum kept
    assert codecs == ["bytes", "crc32c"]
    values = np.random.default_rng(2).normal(size=(3, *GRID.shape_zyx)).astype(np.float32)
    whole = tuple(slice(0, n) for n in GRID.shape_zyx)
    ome_zarr.write_region(image, 0, whole, values)
    np.testing.assert_array_equal(mapped.read_region(image, 0, whole), values)
    chunk = tmp_path / "f.ome.zarr" / "0" / "c" / "0" / "1" / "1" / "1"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"chunk \(0, 1, 1, 1\)|chunk \(1, 1, 1\)"):
        mapped.read_region(image, 0, whole)


@pytest.mark.parametrize("kind", ["compressed", "wrong-size chunk"])
def test_anything_but_a_raw_chunk_file_is_read_by_zarr(tmp_path, kind):
    uri = str(tmp_path / "i.ome.zarr")
    image = ome_zarr.create_image(uri, [GRID], "float32", chunks=6,
                                  compressed=kind == "compressed")
    values = np.random.default_rng(1).normal(size=GRID.shape_zyx).astype(np.float32)
    whole = tuple(slice(0, n) for n in GRID.shape_zyx)
    ome_zarr.write_region(image, 0, whole, values)
    if kind == "wrong-size chunk":
        chunk = tmp_path / "i.ome.zarr" / "0" / "c" / "0" / "0" / "0"
        chunk.write_bytes(chunk.read_bytes()[:-4])
        with pytest.raises(StorageError, match=r"chunk \(0, 0, 0\)"):  # zarr's own report
            mapped.read_region(image, 0, (slice(0, 3), slice(0, 3), slice(0, 3)))
        return
    box = (slice(2, 19), slice(1, 17), slice(4, 20))
    np.testing.assert_array_equal(mapped.read_region(image, 0, box), values[box])


@pytest.mark.parametrize("order", ["C", "F"])
def test_a_mapped_npy_equals_the_loaded_one_and_follows_a_rewrite(tmp_path, order):
    path = str(tmp_path / "r.npy")
    values = np.asfortranarray(np.arange(60, dtype=np.float32).reshape(3, 4, 5)) \
        if order == "F" else np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    np.save(path, values)
    array = mapped.npy(path)
    assert not array.flags.writeable
    np.testing.assert_array_equal(array, np.load(path))
    np.save(path, np.ones((2, 2), np.float64))  # another shape and type, same name
    np.testing.assert_array_equal(mapped.npy(path), np.ones((2, 2)))


def test_an_opened_description_is_reused_only_while_its_metadata_reads_the_same(tmp_path):
    uri = str(tmp_path / "f.ome.zarr")
    field.create_field(uri, GRID, chunks=8)
    first = mapped.opened(uri, field.open_field)
    assert mapped.opened(uri, field.open_field) is first
    other = Grid((5, 6, 7), (2.0, 2.0, 2.0))
    field.create_field(uri, other, chunks=8, overwrite=True)  # replaced at the same place
    again = mapped.opened(uri, field.open_field)
    assert again is not first and again.levels[0].grid == other
