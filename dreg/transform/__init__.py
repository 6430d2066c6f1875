"""Displacement fields: the contract (fixed → moving, c z y x, world components),
sampling at arbitrary points, the reduce of block results into a stage's field, and
what users do with a field: warp images, invert it, transform points."""

from dreg.transform.field import (
    AffineTransform,
    create_field,
    displacement_of,
    open_field,
    sample_field,
)
from dreg.transform.invert import create_inverse, invert_points, invert_region
from dreg.transform.points import check_points_file, transform_batch, transform_xyz
from dreg.transform.reduce import blocks_for_chunk, reduce_chunk
from dreg.transform.warp import check_overlap, create_warped, warp_region

__all__ = [
    "AffineTransform",
    "blocks_for_chunk",
    "check_overlap",
    "check_points_file",
    "create_field",
    "create_inverse",
    "create_warped",
    "displacement_of",
    "invert_points",
    "invert_region",
    "open_field",
    "reduce_chunk",
    "sample_field",
    "transform_batch",
    "transform_xyz",
    "warp_region",
]
