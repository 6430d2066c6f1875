"""The displacement-field contract: a field maps fixed points to moving points
(x ↦ x + u(x)), is stored as c, z, y, x with world components, and is opened, created,
sampled and composed here (its completion mark is `dreg.io.completion`'s, as every
output's). The compiled trilinear kernels live beside it.
"""

from dreg.field.displacement import (
    COMPONENTS,
    FIELD_CHUNK,
    FIXED_TO_MOVING,
    MAPPINGS,
    MOVING_TO_FIXED,
    AffineTransform,
    as_transform,
    create_field,
    displacement_of,
    field_attributes,
    fixed_description,
    open_field,
    sample_field,
)

__all__ = [
    "COMPONENTS",
    "FIELD_CHUNK",
    "FIXED_TO_MOVING",
    "MAPPINGS",
    "MOVING_TO_FIXED",
    "AffineTransform",
    "as_transform",
    "create_field",
    "displacement_of",
    "field_attributes",
    "fixed_description",
    "open_field",
    "sample_field",
]
