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

from dreg import ome_zarr
from dreg.blocks import Bounds, blend_weights
from dreg.field import displacement_of
from dreg.grid import Grid
from dreg.register_block import OK, BlockResult, load_previous, load_residual


def intersect(a: Bounds, b: Bounds) -> Bounds | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in out) else out


def blocks_for_chunk(results: Sequence[BlockResult], chunk: Bounds) -> list[BlockResult]:
    """The successful blocks whose field box overlaps a chunk."""
    return [r for r in results if r.status == OK and intersect(r.block.field_box, chunk)]


def blend_residuals(
    results: Sequence[BlockResult],
    chunk: Bounds,
    image_shape_zyx: Sequence[int],
    factor: float,
) -> np.ndarray:
    """The blended residual r on a chunk, (3, z, y, x) with world (z, y, x) components."""
    shape = tuple(b - a for a, b in chunk)
    # float32, as the residuals are stored and the field is written: weights are in
    # [0, 1] and a voxel sums a few terms, so float64 would only double the traffic.
    numerator = np.zeros((3, *shape), dtype=np.float32)
    denominator = np.zeros(shape, dtype=np.float32)
    for result in results:
        if result.status != OK:
            continue
        overlap = intersect(result.block.field_box, chunk)
        if overlap is None:
            continue
        residual = load_residual(result.residual_uri)
        box = result.block.field_box
        source = (slice(None),) + tuple(
            slice(a - b0, b - b0) for (a, b), (b0, _) in zip(overlap, box, strict=True)
        )
        target = tuple(
            slice(a - c0, b - c0) for (a, b), (c0, _) in zip(overlap, chunk, strict=True)
        )
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
    r_xyz = np.moveaxis(residual, 0, -1)[..., ::-1]
    total_xyz = r_xyz + displacement_of(previous, points_xyz + r_xyz)
    return np.moveaxis(total_xyz[..., ::-1], -1, 0)


def reduce_chunk(
    results: Sequence[BlockResult],
    chunk: Bounds,
    field_grid: Grid,
    image_shape_zyx: Sequence[int],
    factor: float,
    previous,
    destinations: Sequence[str],
) -> dict:
    """Compute one chunk of a stage's field and write it to each destination field.

    `previous` is an AffineTransform or the URI of the previous field. Returns counts.
    """
    previous = load_previous(previous)
    residual = blend_residuals(results, chunk, image_shape_zyx, factor)
    points = field_grid.region_points(tuple(slice(a, b) for a, b in chunk))
    total = compose(residual, points, previous).astype(np.float32)
    region = tuple(slice(a, b) for a, b in chunk)
    for uri in destinations:
        ome_zarr.write_region(ome_zarr.open_image(uri), 0, region, total)
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
