"""Readers of the image formats `dreg.io.convert` imports, one module per format; each
opens a file as a `Source` read one box at a time (see `source.Reader`)."""

from dreg.io.readers import metaimage, nifti, nrrd, tiff
from dreg.io.readers.source import Reader, Source

READERS: tuple[Reader, ...] = (nifti, metaimage, nrrd, tiff)
"""Every reader, in the order their extensions are tried and listed in messages."""

__all__ = ["READERS", "Reader", "Source"]
