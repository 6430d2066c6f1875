"""Import a 3D image file as an OME-Zarr 0.5 multiscale image, out of core.

The header is read first, without voxels; level 0 is then copied one box at a time (a
box is a run of whole output chunks, at most BOX_BYTES), and the pyramid is built from
level 0 chunk by chunk. The reader is picked by the file's extension; each format's
reader is its own module in `dreg.io.readers`, whose docstring says how it reads voxels:

- NIfTI (.nii, .nii.gz) and MetaImage (.mha, .mhd) without compression: ITK streaming,
  which reads only the requested box. NIfTI files are first checked to hold all the
  voxels their header announces (ITK would read zeros instead).
- NRRD (.nrrd, .nhdr) with raw encoding: ITK reads the header; each box's slices are
  read from the file directly, because ITK's NRRD reader always reads the whole file.
- TIFF (.tif, .tiff): tifffile as a zarr store, so only the pages a box needs are read.
- Compressed MetaImage and gzip/bzip2 NRRD: ITK cannot read part of these, so the whole
  image is read into memory once (the only case that needs memory of the image's size).

Spacing, origin and direction come from ITK unchanged (x, y, z order); arrays are z, y, x.
Integer voxel types are kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from dreg.errors import InputError
from dreg.grid import Region, region_shape, relative_region
from dreg.io import ome_zarr, pyramid, storage
from dreg.io.readers import READERS, Reader, Source

BOX_BYTES = 32 * 2**20  # peak memory of reading one box
SUPPORTED_SUFFIXES = tuple(suffix for reader in READERS for suffix in reader.SUFFIXES)

__all__ = ["BOX_BYTES", "SUPPORTED_SUFFIXES", "Source", "boxes", "convert", "open_source"]


# ----------------------------------------------------------------------------- readers


def _reader(path: str) -> Reader | None:
    lower = path.lower()
    return next((reader for reader in READERS
                 if any(lower.endswith(suffix) for suffix in reader.SUFFIXES)), None)


def _check_input(path: str) -> Reader:
    if storage.is_s3(path) or "://" in path:
        raise InputError(f"{path}: convert reads local files only")
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a file")
    reader = _reader(path)
    if reader is None:
        expected = ", ".join(SUPPORTED_SUFFIXES)
        raise InputError(f"{path}: unsupported format (expected one of {expected})")
    return reader


def open_source(input_path: str | os.PathLike) -> Source:
    """Open an image file for reading boxes: header only, no voxels yet (except for the
    formats ITK cannot read in parts; see the module docstring).

    Raises InputError naming the file when it is missing, of an unsupported format,
    unreadable, or not a scalar 3D image.
    """
    path = str(input_path)
    return _check_input(path).open_source(path)


# ----------------------------------------------------------------------------- convert


def boxes(
    shape_zyx: tuple[int, int, int], chunks_zyx: tuple[int, int, int], itemsize: int,
    budget: int = BOX_BYTES,
) -> Iterator[Region]:
    """Boxes of whole chunks covering a grid, each at most about `budget` bytes.

    A box is one chunk deep in z, as wide in x as the budget allows (whole rows are
    contiguous in most files), then as tall in y as the budget allows.
    """
    nz, ny, nx = shape_zyx
    cz, cy, cx = chunks_zyx
    per_x = cz * cy * itemsize
    bx = nx if per_x * nx <= budget else max(cx, budget // per_x // cx * cx)
    by = cy if bx < nx else min(ny, max(cy, budget // (cz * nx * itemsize) // cy * cy))
    for z in range(0, nz, cz):
        for y in range(0, ny, by):
            for x in range(0, nx, bx):
                yield (slice(z, min(z + cz, nz)), slice(y, min(y + by, ny)),
                       slice(x, min(x + bx, nx)))


def _write_level0(image: ome_zarr.OmeZarrImage, source: Source, workers: int) -> None:
    """Copy the source into level 0, box by box; a box's chunks are written in parallel."""
    level = image.level(0)
    # BOX_BYTES is read here, at call time, so that tests can make every box one chunk.
    for box in boxes(level.grid.shape_zyx, level.chunks_zyx, source.read_bytes_per_voxel,
                     BOX_BYTES):
        data = source.read(box)
        chunks = [
            tuple(slice(c.start + b.start, c.stop + b.start)
                  for c, b in zip(chunk, box, strict=True))
            for chunk in ome_zarr.chunk_regions(region_shape(box), level.chunks_zyx)
        ]
        ome_zarr.write_chunks(image, 0, chunks, lambda chunk, b=box, d=data:
                              d[relative_region(chunk, b)], max(1, workers))
        del data


def convert(
    input_path: str | os.PathLike,
    out_uri: str,
    chunks: int = ome_zarr.DEFAULT_CHUNK,
    workers: int = 2,
    overwrite: bool = False,
) -> ome_zarr.OmeZarrImage:
    """Convert a .nii/.nii.gz/.mha/.mhd/.nrrd/.nhdr/.tif/.tiff image to OME-Zarr 0.5 at
    `out_uri` (local path or s3://), with a pyramid down to a longest axis of 64 voxels.

    `chunks` is the chunk edge in voxels, `workers` the number of chunks processed in
    parallel. An existing output is replaced only with `overwrite`. If the conversion
    fails part way, the partial output is removed.
    """
    if chunks < 1 or workers < 1:
        raise InputError(f"chunks and workers must be positive (got {chunks}, {workers})")
    source = open_source(input_path)
    try:
        name = Path(source.path).name
        image = ome_zarr.create_image(
            out_uri,
            pyramid.pyramid_grids(source.grid),
            source.dtype,
            chunks=chunks,
            name=name,
            overwrite=overwrite,
            dreg_attributes={"source": {"file": name, "reader": source.method}},
        )
        try:
            _write_level0(image, source, workers)
            pyramid.build_pyramid(image, workers=workers)
        except BaseException:
            # A half-written image would pass for a converted one.
            storage.remove_tree(image.uri)
            raise
    finally:
        source.close()
    return image
