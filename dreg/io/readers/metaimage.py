"""MetaImage (.mha, .mhd): read through ITK, with streaming (only the requested box) when
the voxels are not compressed; a compressed file is read whole, once, since ITK cannot
read part of it.
"""

from __future__ import annotations

from dreg.io.readers import itk_io
from dreg.io.readers.source import Source

SUFFIXES = (".mha", ".mhd")


def open_source(path: str) -> Source:
    """Open a MetaImage file for reading boxes: header only, unless it is compressed."""
    header = itk_io.read_header(path)
    return itk_io.open_with_itk(path, header, itk_io.read_type(path, header))
