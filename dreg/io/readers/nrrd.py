"""NRRD (.nrrd, .nhdr): ITK reads the header. With raw encoding each box's slices are
read from the file directly, because ITK's NRRD reader always reads the whole file;
gzip/bzip2 NRRD (and other layouts) go through ITK, which reads the whole image once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dreg.grid import Region
from dreg.io.readers import itk_io
from dreg.io.readers.source import Source

SUFFIXES = (".nrrd", ".nhdr")


def open_source(path: str) -> Source:
    """Open a NRRD file for reading boxes: header only, unless ITK must read it whole."""
    header = itk_io.read_header(path)
    raw = _raw_nrrd(path, header)
    if raw is not None:
        return Source(path, header.grid, header.dtype, "raw-nrrd", raw)
    return itk_io.open_with_itk(path, header, itk_io.read_type(path, header))


def _nrrd_fields(path: str) -> tuple[dict[str, str], int]:
    """The header fields of a NRRD file and the byte offset just after the header."""
    fields: dict[str, str] = {}
    with open(path, "rb") as handle:
        magic = handle.readline()
        if not magic.startswith(b"NRRD"):
            return {}, 0
        while True:
            line = handle.readline()
            if not line or line in (b"\n", b"\r\n"):
                return fields, handle.tell()
            text = line.decode("latin-1").rstrip("\r\n")
            if text.startswith("#") or ":=" in text or ":" not in text:
                continue
            key, value = text.split(":", 1)
            fields[key.strip().lower().replace(" ", "")] = value.strip()


class _RawArray:
    """Boxes of a raw block of voxels in a file (C order, z slowest): for each slice of a
    box, its run of rows is one contiguous read."""

    def __init__(self, path: str, offset: int, dtype: np.dtype, shape_zyx) -> None:
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, tuple(shape_zyx)

    def __getitem__(self, box: Region) -> np.ndarray:
        zs, ys, xs = box
        _, ny, nx = self.shape
        rows = ys.stop - ys.start
        out = np.empty((zs.stop - zs.start, rows, xs.stop - xs.start), dtype=self.dtype)
        with open(self.path, "rb") as handle:
            for k, z in enumerate(range(zs.start, zs.stop)):
                handle.seek(self.offset + (z * ny + ys.start) * nx * self.dtype.itemsize)
                run = np.fromfile(handle, dtype=self.dtype, count=rows * nx)
                out[k] = run.reshape(rows, nx)[:, xs]
        return out


def _raw_nrrd(path: str, header: itk_io.ItkHeader) -> _RawArray | None:
    """A reader of a raw-encoded NRRD's voxels, or None when the file's layout is not a
    single raw block (compressed, several data files, line skips)."""
    fields, header_end = _nrrd_fields(path)
    if fields.get("encoding", "").lower() != "raw" or int(fields.get("lineskip", "0")) != 0:
        return None
    data_file = fields.get("datafile")
    if data_file is None:
        data_path, offset = path, header_end
    elif data_file.startswith("LIST") or len(data_file.split()) > 1:
        return None
    else:
        data_path, offset = str(Path(path).parent / data_file), 0
    order = ">" if fields.get("endian", "little").lower() == "big" else "<"
    dtype = header.dtype.newbyteorder(order)
    count = int(np.prod(header.grid.shape_zyx)) * dtype.itemsize
    size = os.path.getsize(data_path) if os.path.isfile(data_path) else -1
    skip = int(fields.get("byteskip", "0"))
    offset = size - count if skip == -1 else offset + skip
    if offset < 0 or size < offset + count:
        return None
    return _RawArray(data_path, offset, dtype, header.grid.shape_zyx)
