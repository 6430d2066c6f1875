"""Displacement fields: the contract (fixed → moving, c z y x, world components),
sampling at arbitrary points, and the reduce of block results into a stage's field."""

from dreg.transform.field import (
    AffineTransform,
    create_field,
    displacement_of,
    open_field,
    sample_field,
)
from dreg.transform.reduce import blocks_for_chunk, reduce_chunk

__all__ = [
    "AffineTransform",
    "blocks_for_chunk",
    "create_field",
    "displacement_of",
    "open_field",
    "reduce_chunk",
    "sample_field",
]
