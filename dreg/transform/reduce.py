"""Reduce block results into a stage's displacement field, one field chunk at a time.

For a chunk of the stage's field grid: blend the residuals of the successful blocks that
cover it with weights that fall linearly to zero toward each padded edge (renormalised
where a neighbour is missing or failed; zero residual where no block succeeded), then
compose with the previous transform: u(x) = r(x) + u_prev(x + r(x)). All NumPy, vectorised
over the chunk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from dreg.grid import (
    Grid,
    Region,
    components_to_vectors,
    intersect_regions,
    region_shape,
    relative_region,
    vectors_to_components,
)
from dreg.io import ome_zarr
from dreg.registration.outcome import OK, BlockResult, load_residual
from dreg.registration.tiling import blend_weights
from dreg.transform.field import as_transform, displacement_of


def blocks_for_chunk(results: Sequence[BlockResult], chunk: Region) -> list[BlockResult]:
    """The successful blocks whose field box overlaps a chunk."""
    return [r for r in results
            if r.status == OK and intersect_regions(r.block.field_box, chunk)]


def blend_residuals(
    results: Sequence[BlockResult],
    chunk: Region,
    image_shape_zyx: Sequence[int],
    factor: float,
) -> np.ndarray:
    """The blended residual r on a chunk, (3, z, y, x) with world (z, y, x) components."""
    shape = region_shape(chunk)
    # float32, as the residuals are stored and the field is written: weights are in
    # [0, 1] and a voxel sums a few terms, so float64 would only double the traffic.
    numerator = np.zeros((3, *shape), dtype=np.float32)
    denominator = np.zeros(shape, dtype=np.float32)
    for result in results:
        if result.status != OK:
            continue
        overlap = intersect_regions(result.block.field_box, chunk)
        if overlap is None:
            continue
        residual = load_residual(result.residual_uri)
        source = (slice(None), *relative_region(overlap, result.block.field_box))
        target = relative_region(overlap, chunk)
        weight = blend_weights(result.block, overlap, image_shape_zyx, factor)
        weight = weight.astype(np.float32)
        numerator[(slice(None),) + target] += residual[source] * weight
        denominator[target] += weight
    # Where no block succeeded the residual is zero.
    return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                     where=denominator > 0)


def compose(residual: np.ndarray, points_xyz: np.ndarray, previous) -> np.ndarray:
    """u(x) = r(x) + u_prev(x + r(x)) for residuals (3, ...) in world (z, y, x) components
    at world points (..., 3); returns (3, ...) in world (z, y, x) components."""
    r_xyz = components_to_vectors(residual)
    return vectors_to_components(r_xyz + displacement_of(previous, points_xyz + r_xyz))


def reduce_chunk(
    results: Sequence[BlockResult],
    chunk: Region,
    field_grid: Grid,
    image_shape_zyx: Sequence[int],
    factor: float,
    previous,
    destinations: Sequence[str],
) -> dict:
    """Compute one chunk of a stage's field and write it to each destination field.

    `previous` is an AffineTransform or the URI of the previous field. Returns counts.
    """
    previous = as_transform(previous)
    residual = blend_residuals(results, chunk, image_shape_zyx, factor)
    points = field_grid.region_points(chunk)
    total = compose(residual, points, previous).astype(np.float32)
    for uri in destinations:
        ome_zarr.write_region(ome_zarr.open_image(uri), 0, chunk, total)
    return {"voxels": int(np.prod(total.shape[1:])), "blocks": len(results)}


def field_identity(identity_of_inputs: str, results: Sequence[BlockResult]) -> str:
    """An identifier of a stage's field content, from what it was computed from: the
    stage's inputs and every block's outcome (residuals are named by their inputs). It
    keys the next stage's cache without hashing the field's voxels."""
    rows = sorted(
        (list(r.block.index), r.status, r.residual_uri or "") for r in results
    )
    payload = json.dumps([identity_of_inputs, rows]).encode()
    return hashlib.sha256(payload).hexdigest()[:32]
