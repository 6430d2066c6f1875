"""What uses a finished field: warp images onto the fixed grid, invert the field,
transform point sets, with their plans, the outputs' bookkeeping and OUT's scene."""

from dreg.apply.invert import create_inverse, invert_points, invert_region
from dreg.apply.points import transform_batch, transform_xyz
from dreg.apply.warp import check_image_meets_field, create_warped, warp_region

__all__ = [
    "check_image_meets_field",
    "create_inverse",
    "create_warped",
    "invert_points",
    "invert_region",
    "transform_batch",
    "transform_xyz",
    "warp_region",
]
