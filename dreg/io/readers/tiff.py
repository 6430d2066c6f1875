"""TIFF (.tif, .tiff): tifffile as a zarr store, so only the pages a box needs are read.
Pages are z, rows y, columns x. Spacing comes from ImageJ or OME metadata (else 1);
origin is 0 and direction identity (TIFF has no such fields).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import numpy as np

from dreg.errors import InputError, first_line
from dreg.grid import Grid, zyx_to_xyz
from dreg.io.readers.source import Source, require_3d

SUFFIXES = (".tif", ".tiff")


def _tiff_spacing_xyz(tiff) -> tuple[float, float, float]:
    """Voxel spacing from OME or ImageJ metadata; 1 where the file does not say."""
    if tiff.is_ome and tiff.ome_metadata:
        root = ElementTree.fromstring(tiff.ome_metadata)
        pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
        if pixels is not None:
            return tuple(float(pixels.get(f"PhysicalSize{a}", 1.0)) for a in "XYZ")
    if tiff.is_imagej:
        page = tiff.pages[0]

        def from_resolution(tag: str) -> float:
            value = page.tags.get(tag)
            if value is None:
                return 1.0
            numerator, denominator = value.value
            return denominator / numerator if numerator else 1.0

        z = float((tiff.imagej_metadata or {}).get("spacing", 1.0))
        return from_resolution("XResolution"), from_resolution("YResolution"), z
    return 1.0, 1.0, 1.0


def open_source(path: str) -> Source:
    """Open a TIFF for reading boxes: its first series, pages z, rows y, columns x."""
    import tifffile
    import zarr

    try:
        tiff = tifffile.TiffFile(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable file
        raise InputError(f"{path}: unreadable TIFF ({first_line(exc)})") from None
    try:
        series = tiff.series[0]
        axes = series.axes
        if "S" in axes or "C" in axes:
            raise InputError(f"{path}: needs a scalar 3D image; the TIFF has axes {axes} "
                             f"(shape {list(series.shape)})")
        require_3d(path, list(zyx_to_xyz(series.shape)), 1)
        spacing = _tiff_spacing_xyz(tiff)
        try:
            grid = Grid(shape_zyx=series.shape, spacing_xyz=spacing)
        except ValueError as exc:
            raise InputError(f"{path}: unusable image geometry ({exc})") from None
        array = zarr.open_array(series.aszarr(level=0), mode="r")
        dtype = np.dtype(series.dtype).newbyteorder("=")
    except BaseException:
        tiff.close()
        raise
    return Source(path, grid, dtype, "tifffile-zarr", array, handle=tiff)
