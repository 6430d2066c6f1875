"""Storage and images: local paths and s3:// URIs, OME-Zarr multiscale images read and
written region by region, pyramids built out of core, and import of other formats."""

from dreg.io.ome_zarr import (
    OmeZarrImage,
    chunk_regions,
    create_image,
    fingerprint,
    open_image,
    read_region,
    write_chunks,
    write_region,
)
from dreg.io.pyramid import build_pyramid, pyramid_grids

__all__ = [
    "OmeZarrImage",
    "build_pyramid",
    "chunk_regions",
    "create_image",
    "fingerprint",
    "open_image",
    "pyramid_grids",
    "read_region",
    "write_chunks",
    "write_region",
]
