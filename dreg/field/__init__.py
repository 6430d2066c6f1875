"""The displacement-field contract: a field maps fixed points to moving points
(x ↦ x + u(x)), is stored as c, z, y, x with world components, and is opened, created,
sampled, composed and marked complete here. The compiled trilinear kernels live beside it.
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
    field_identity_mark,
    fixed_description,
    is_complete,
    mark_complete,
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
    "field_identity_mark",
    "fixed_description",
    "is_complete",
    "mark_complete",
    "open_field",
    "sample_field",
]
