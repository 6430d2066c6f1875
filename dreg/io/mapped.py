"""Local files read without copies or round trips: boxes of raw zarr v3 arrays from their
memory-mapped chunk files, .npy arrays mapped, and opened image descriptions reused while
their metadata files read the same.

zarr reads and decodes every chunk that a box touches whole. A box one voxel wider than
a chunk on each side (what composing with a previous field reads for each chunk of the
next) touches 27 chunks: 19 times the voxels it returns. For an array whose only codec
is `bytes` (the raw C-order array, as displacement fields are stored) in a local folder,
a chunk file *is* the chunk: mapped, only the pages the box needs are read, straight
from the page cache, and nothing is allocated per chunk.

Anything else (S3, compression, checksum codecs, zarr v2, a chunk file of the wrong
size) is read by zarr (`ome_zarr.read_region`), with the same result.
"""

from __future__ import annotations

import json
import mmap
import os
from itertools import product
from pathlib import Path

import google_crc32c
import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata.v3 import ArrayV3Metadata

from dreg.grid import Region
from dreg.io import ome_zarr, storage


def _raw_metadata(image: ome_zarr.OmeZarrImage, level: int) -> ArrayV3Metadata | None:
    """A level's zarr v3 array metadata when its chunk files can be mapped (raw, with or
    without a trailing crc32c), else None.
    Read from the local zarr.json directly: a few tens of microseconds, where opening the
    array through zarr costs a round trip to zarr's event-loop thread."""
    if storage.is_s3(image.uri) or image.zarr_format != 3:
        return None
    path = os.path.join(image.uri, image.level(level).path, "zarr.json")
    try:
        with open(path, "rb") as document:
            metadata = ArrayV3Metadata.from_dict(json.loads(document.read()))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # zarr reads it, and says what is wrong
    codecs = metadata.codecs
    checksummed = len(codecs) == 2 and isinstance(codecs[1], Crc32cCodec)
    if (len(codecs) != 1 + checksummed or not isinstance(codecs[0], BytesCodec)
            or metadata.storage_transformers
            or not isinstance(metadata.chunk_grid, RegularChunkGrid)):
        return None
    return metadata


def read_region(image: ome_zarr.OmeZarrImage, level: int, region: Region) -> np.ndarray:
    """`ome_zarr.read_region` (a vector image gives (c, z, y, x)), mapping chunk files
    where the array allows it. (An opened image's URI is normalised: an absolute path.)"""
    metadata = _raw_metadata(image, level)
    box = ((slice(0, image.components),) if image.components is not None else ()) + tuple(
        region)
    data = None
    inside = metadata is not None and len(box) == len(metadata.shape) and all(
        0 <= s.start < s.stop <= n for s, n in zip(box, metadata.shape, strict=True))
    if inside:
        folder = os.path.join(image.uri, image.level(level).path)
        data = _read_mapped(metadata, folder, box)
    return ome_zarr.read_region(image, level, region) if data is None else data


def _read_mapped(metadata: ArrayV3Metadata, folder: str,
                 box: tuple[slice, ...]) -> np.ndarray | None:
    """The box read chunk file by chunk file; None when a chunk file is not the raw chunk
    (its size differs), so that zarr reads the box and reports what is wrong."""
    chunk_shape = tuple(metadata.chunk_grid.chunk_shape)
    dtype = np.dtype(metadata.dtype.to_native_dtype())  # with the stored byte order
    chunk_bytes = int(np.prod(chunk_shape)) * dtype.itemsize
    checksummed = isinstance(metadata.codecs[-1], Crc32cCodec)
    out = np.empty(tuple(s.stop - s.start for s in box), dtype=dtype.newbyteorder("="))
    ranges = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in
              zip(box, chunk_shape, strict=True)]
    for coords in product(*ranges):
        starts = [i * c for i, c in zip(coords, chunk_shape, strict=True)]
        source = tuple(slice(max(s.start - a, 0), min(s.stop - a, c))
                       for s, a, c in zip(box, starts, chunk_shape, strict=True))
        target = tuple(slice(a + p.start - s.start, a + p.stop - s.start)
                       for s, a, p in zip(box, starts, source, strict=True))
        path = os.path.join(folder, metadata.encode_chunk_key(coords))
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            out[target] = metadata.fill_value  # never written: the fill value, as zarr
            continue
        if size != chunk_bytes + CHECKSUM_BYTES * checksummed:
            return None
        chunk = _mapped_chunk(path, dtype, chunk_shape, checksummed)
        if chunk is None:
            return None
        out[target] = chunk[source]
    return out


CHECKSUM_BYTES = 4  # crc32c, little-endian, after the chunk's bytes


def _mapped_chunk(path: str, dtype: np.dtype, shape: tuple[int, ...],
                  checksummed: bool) -> np.ndarray | None:
    """A chunk file as an array over its mapping (unmapped when the array goes); None
    when its checksum does not match."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(descriptor, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(descriptor)
    count = int(np.prod(shape))
    if checksummed:
        body = np.frombuffer(mapping, dtype=np.uint8, count=count * dtype.itemsize)
        if np.uint32(google_crc32c.value(body)).tobytes() != mapping[body.size:]:
            return None
    return np.frombuffer(mapping, dtype=dtype, count=count).reshape(shape)


# Per worker process, a few hundred bytes an entry; each entry is checked against the
# file (or metadata documents) it was read from before it is used.
_NPY_HEADERS: dict[str, tuple[tuple, tuple]] = {}
_OPENED: dict[tuple, tuple[tuple[bytes, ...], ome_zarr.OmeZarrImage]] = {}
_MEMO_LIMIT = 4096


def _remember(memo: dict, key, value) -> None:
    if len(memo) >= _MEMO_LIMIT:
        memo.pop(next(iter(memo)))
    memo[key] = value


def npy(path: str) -> np.ndarray:
    """A local .npy file as a read-only array over its mapping, the header parsed once
    per file version (NumPy parses it with a Python literal evaluation, a sizeable part
    of mapping a small file that a worker maps again for every chunk it reaches)."""
    info = os.stat(path)
    version = (info.st_ino, info.st_size, info.st_mtime_ns)
    known = _NPY_HEADERS.get(path)
    if known is None or known[0] != version:
        with open(path, "rb") as handle:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(
                np.lib.format.read_magic(handle))
            if read_header is None:  # a format version without a public reader
                return np.load(path, mmap_mode="r")
            shape, fortran, dtype = read_header(handle)
            known = (version, (shape, fortran, dtype, handle.tell()))
        _remember(_NPY_HEADERS, path, known)
    shape, fortran, dtype, offset = known[1]
    count = int(np.prod(shape))
    if info.st_size < offset + count * dtype.itemsize or count == 0:
        return np.load(path)  # NumPy says what is wrong with it
    descriptor = os.open(path, os.O_RDONLY)
    try:
        # A plain array over the mapping (np.memmap's subclass costs more to make and to
        # slice); the mapping is closed when the last array using it goes.
        mapping = mmap.mmap(descriptor, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(descriptor)
    flat = np.frombuffer(mapping, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def _metadata_documents(image: ome_zarr.OmeZarrImage) -> tuple[bytes, ...] | None:
    """The zarr.json files a local zarr v3 image's description is read from."""
    if storage.is_s3(image.uri) or image.zarr_format != 3:
        return None
    paths = [os.path.join(image.uri, "zarr.json")] + [
        os.path.join(image.uri, level.path, "zarr.json") for level in image.levels]
    try:
        return tuple(Path(p).read_bytes() for p in paths)
    except OSError:
        return None


def opened(uri: str, opener) -> ome_zarr.OmeZarrImage:
    """`opener(uri)`, whose result is a function of the image's metadata documents:
    reused, for a local image, while those documents read the same (tens of
    microseconds, where opening through zarr costs two round trips to its event-loop
    thread, for every chunk of the field)."""
    key = (opener, uri)  # open_field checks more than open_image: one entry for each
    known = _OPENED.get(key)
    if known is not None and _metadata_documents(known[1]) == known[0]:
        return known[1]
    image = opener(uri)
    documents = _metadata_documents(image)
    if documents is not None:
        _remember(_OPENED, key, (documents, image))
    return image
