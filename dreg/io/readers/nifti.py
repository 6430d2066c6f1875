"""NIfTI (.nii, .nii.gz): read through ITK with streaming, which reads only the requested
box. For .nii.gz ITK decompresses the stream up to the box each time: memory stays
bounded, time grows with the file. Files are first checked to hold all the voxels their
header announces (ITK would read zeros instead).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from dreg.errors import InputError, first_line
from dreg.io.readers import itk_io
from dreg.io.readers.source import Source

SUFFIXES = (".nii.gz", ".nii")


def open_source(path: str) -> Source:
    """Open a NIfTI file for reading boxes: header only, after checking that the file is
    not truncated."""
    header = itk_io.read_header(path)
    pixel = itk_io.read_type(path, header)
    _check_nifti_complete(path)
    return itk_io.open_with_itk(path, header, pixel)


def _nifti_data_end(header: bytes) -> int | None:
    """Where a NIfTI-1 or NIfTI-2 single file's voxel data ends, from its header; None
    when the header is not one of those."""
    for order in "<>":
        size = int(np.frombuffer(header[:4], dtype=f"{order}i4")[0]) if len(header) >= 4 else 0
        if size == 348 and len(header) >= 348:
            dims = np.frombuffer(header[40:56], dtype=f"{order}i2")
            bitpix = int(np.frombuffer(header[72:74], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(header[108:112], dtype=f"{order}f4")[0])
        elif size == 540 and len(header) >= 540:
            dims = np.frombuffer(header[16:80], dtype=f"{order}i8")
            bitpix = int(np.frombuffer(header[14:16], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(header[168:176], dtype=f"{order}i8")[0])
        else:
            continue
        count = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + int(dims[0])]]))
        return max(offset, size) + count * bitpix // 8
    return None


def _check_nifti_complete(path: str) -> None:
    """Fail when a NIfTI file holds fewer voxel bytes than its header says.

    ITK's NIfTI reader fills the missing part of a truncated file with zeros, silently.
    For .nii.gz this decompresses the file once (streaming, constant memory).
    """
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(540)
            end = _nifti_data_end(header)
            if end is None:
                return  # not a single-file NIfTI-1/2: leave it to ITK
            if opener is open:
                available = os.path.getsize(path)
            else:
                available = len(header)
                while block := handle.read(16 * 2**20):
                    available += len(block)
    except (OSError, EOFError) as exc:  # gzip reports a cut stream as EOFError
        raise InputError(f"{path}: cannot read voxels ({first_line(exc)})") from None
    if available < end:
        raise InputError(f"{path}: truncated file ({available} bytes; its header needs {end})")
