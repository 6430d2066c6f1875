"""OME-Zarr multiscale images: open, read a region, create, write region by region.

Writes OME-Zarr 0.5 on zarr v3 (its metadata built and validated by ome-zarr-models);
reads 0.5 (zarr v3) and 0.4 (zarr v2). The image is a small dataclass of metadata;
voxels are read and written per region, so nothing here ever holds a whole level in
memory. The modules: `metadata` (the image dataclass, NGFF metadata read and built),
`read`, `write`, and `fingerprints` (the version of an image's content).
"""

from dreg.io.ome_zarr.fingerprints import ImageVersion, fingerprint, image_version
from dreg.io.ome_zarr.metadata import (
    DEFAULT_CHUNK,
    DISPLACEMENT_OME_VERSION,
    IMAGE_OME_VERSION,
    SPATIAL_AXES,
    ImageLevel,
    OmeZarrImage,
    _ngff_attrs,
    update_attributes,
)
from dreg.io.ome_zarr.read import open_image, open_level, read_region
from dreg.io.ome_zarr.write import (
    IMAGE,
    check_can_create,
    chunk_regions,
    create_image,
    write_chunks,
    write_level_by_chunks,
    write_region,
)

__all__ = [
    "DEFAULT_CHUNK",
    "IMAGE",
    "DISPLACEMENT_OME_VERSION",
    "IMAGE_OME_VERSION",
    "SPATIAL_AXES",
    "ImageLevel",
    "ImageVersion",
    "OmeZarrImage",
    "open_level",
    "_ngff_attrs",
    "check_can_create",
    "chunk_regions",
    "create_image",
    "fingerprint",
    "image_version",
    "open_image",
    "read_region",
    "update_attributes",
    "write_chunks",
    "write_level_by_chunks",
    "write_region",
]
