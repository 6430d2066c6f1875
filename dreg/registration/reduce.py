"""Reduce block results into a stage's displacement field, one field chunk at a time.

For a chunk of the stage's field grid: blend the residuals of the successful blocks that
cover it with weights that fall linearly to zero toward each padded edge (renormalised
where a neighbour is missing or failed; zero residual where no block succeeded), then
compose with the previous transform: u(x) = r(x) + u_prev(x + r(x)).

The loops over a chunk's voxels are compiled (Numba): blending accumulates each block's
residual times its separable weight in place, and composition computes, moves and
samples each voxel's point in one pass (dreg.field.trilinear). Both keep the
arithmetic of the plain NumPy formulas: float32 blending, float64 points, SciPy's
trilinear sums.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dreg.compiled import jit
from dreg.errors import StorageError
from dreg.field import AffineTransform, as_transform, displacement_of, trilinear
from dreg.grid import (
    Grid,
    Region,
    components_to_vectors,
    intersect_regions,
    region_from_bounds,
    region_shape,
    relative_region,
    vectors_to_components,
)
from dreg.io import mapped, ome_zarr, storage
from dreg.registration.outcome import (
    OK,
    BlockResult,
    check_finite,
    check_residual,
    load_residual,
)
from dreg.registration.tiling import Block, axis_weights, tile


def blocks_for_chunk(results: Sequence[BlockResult], chunk: Region) -> list[BlockResult]:
    """The successful blocks whose field box overlaps a chunk."""
    return [r for r in results
            if r.status == OK and intersect_regions(r.block.field_box, chunk)]


@jit
def _accumulate(numerator, denominator, residual, wz, wy, wx, oz, oy, ox):
    """numerator[:, target] += residual * w and denominator[target] += w, with the
    target box starting at (oz, oy, ox) and w = float32((wz * wy) * wx) per voxel: the
    float32 arithmetic of residual[source] * weight.astype(float32) in NumPy."""
    for m in range(3):
        for a in range(residual.shape[1]):
            for b in range(residual.shape[2]):
                wzy = wz[a] * wy[b]
                for c in range(residual.shape[3]):
                    numerator[m, oz + a, oy + b, ox + c] += (
                        residual[m, a, b, c] * np.float32(wzy * wx[c]))
    for a in range(residual.shape[1]):
        for b in range(residual.shape[2]):
            wzy = wz[a] * wy[b]
            for c in range(residual.shape[3]):
                denominator[oz + a, oy + b, ox + c] += np.float32(wzy * wx[c])


@jit
def _normalise(numerator, denominator):
    """numerator /= denominator where it is positive, else 0 (in place)."""
    for a in range(denominator.shape[0]):
        for b in range(denominator.shape[1]):
            for c in range(denominator.shape[2]):
                d = denominator[a, b, c]
                for m in range(3):
                    numerator[m, a, b, c] = numerator[m, a, b, c] / d if d > 0 else 0.0


S3_FETCHES = 8  # residuals fetched from S3 at once


def _residual_part(uri: str, block: Block, source: tuple[slice, ...]) -> np.ndarray:
    """The part `source` of a block's residual, float32, checked: the whole residual must
    have the block's shape and dtype (the compiled loops index it by the block's box), the
    part must be finite; StorageError naming the file otherwise.

    A local .npy is memory-mapped, so only the pages of the part a chunk needs are read
    (a block reaches up to eight chunks, most of them by a thin slab); anything else is
    read whole by `load_residual`, and the part copied out of it."""
    try:
        if not storage.is_s3(uri) and uri.endswith(".npy"):
            residual = mapped.npy(uri)  # a local path, as the block task wrote it
        else:
            residual = load_residual(uri)
    except ValueError as exc:  # not a .npy file, or a truncated one
        raise StorageError(f"{uri}: not a block residual ({exc})", transient=False) from None
    check_residual(residual, block, uri, values=False)
    part = np.asarray(residual[source], dtype=np.float32)
    check_finite(part, uri)
    return part


def _residual_parts(items: list[tuple[str, Block, tuple[slice, ...]]]):
    """`_residual_part` of each (uri, block, source), in order. From S3 (where each
    residual is a request, and its latency the cost) up to `S3_FETCHES` at a time."""
    if not any(storage.is_s3(uri) for uri, _, _ in items):
        return (_residual_part(*item) for item in items)
    pool = ThreadPoolExecutor(max_workers=S3_FETCHES)
    parts = pool.map(lambda item: _residual_part(*item), items)
    pool.shutdown(wait=False)  # the submitted fetches still run; map yields them in order
    return parts


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
    return _blend_into(numerator, denominator, results, chunk, image_shape_zyx, factor)


def _blend_into(numerator: np.ndarray, denominator: np.ndarray,
                results: Sequence[BlockResult], chunk: Region, image_shape_zyx: Sequence[int],
                factor: float) -> np.ndarray:
    """`blend_residuals` into zeroed arrays of the chunk's shape; returns `numerator`."""
    reaching = [(result, overlap) for result in results if result.status == OK
                and (overlap := intersect_regions(result.block.field_box, chunk)) is not None]
    parts = _residual_parts([
        (result.residual_uri, result.block,
         (slice(None), *relative_region(overlap, result.block.field_box)))
        for result, overlap in reaching])
    for (result, overlap), part in zip(reaching, parts, strict=True):
        wz, wy, wx = axis_weights(result.block, overlap, image_shape_zyx, factor)
        target = relative_region(overlap, chunk)
        _accumulate(numerator, denominator, part, wz, wy, wx, *(s.start for s in target))
    # Where no block succeeded the residual is zero.
    _normalise(numerator, denominator)
    return numerator


_SCRATCH = threading.local()


def _scratch(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zeroed numerator and denominator and an output array for a chunk of `shape`,
    reused by the chunks a worker thread reduces: fresh arrays of a few MB each cost
    page faults on every chunk (workers hand blocks of 1 MiB and more straight back to
    the system: dreg.process)."""
    arrays = getattr(_SCRATCH, "arrays", {})
    if shape not in arrays:
        if len(arrays) >= 4:  # a field has a handful of chunk shapes (the edge ones)
            arrays.clear()
        arrays[shape] = (np.empty((3, *shape), np.float32), np.empty(shape, np.float32),
                         np.empty((3, *shape), np.float32))
        _SCRATCH.arrays = arrays
    numerator, denominator, out = arrays[shape]
    numerator.fill(0)
    denominator.fill(0)
    return numerator, denominator, out


def compose(residual: np.ndarray, points_xyz: np.ndarray, previous) -> np.ndarray:
    """u(x) = r(x) + u_prev(x + r(x)) for residuals (3, ...) in world (z, y, x) components
    at world points (..., 3); returns (3, ...) in world (z, y, x) components."""
    r_xyz = components_to_vectors(residual)
    return vectors_to_components(r_xyz + displacement_of(previous, points_xyz + r_xyz))


def compose_on_grid(residual: np.ndarray, chunk: Region, field_grid: Grid,
                    previous, out: np.ndarray | None = None) -> np.ndarray:
    """`compose` at the voxels of a chunk of the field grid, in one compiled pass: the
    same u(x) = r(x) + u_prev(x + r(x)), float32 (3, z, y, x), into `out` if given.
    `previous` is an AffineTransform or an opened field; of a field only the box the
    moved points reach is read, as `sample_field` does."""
    residual = np.asarray(residual, dtype=np.float32)
    start = np.array([s.start for s in chunk], dtype=np.int64)
    to_world = np.ascontiguousarray(field_grid.index_to_world_matrix)
    origin = np.asarray(field_grid.origin_xyz, dtype=float)
    out = np.empty_like(residual) if out is None else out
    if isinstance(previous, AffineTransform):
        trilinear.compose_affine(residual, start, to_world, origin,
                                 np.asarray(previous.matrix, dtype=float),
                                 np.asarray(previous.translation, dtype=float), out)
        return out
    grid = previous.levels[0].grid
    to_index = np.linalg.inv(grid.index_to_world_matrix)
    index_origin = np.asarray(grid.origin_xyz, dtype=float)
    low, high = trilinear.moved_index_bounds(residual, start, to_world, origin, to_index,
                                             index_origin)
    shape = np.array(grid.shape_zyx)
    lo = np.clip(np.floor(low).astype(int), 0, shape - 1)
    hi = np.clip(np.ceil(high).astype(int) + 1, lo + 1, shape)
    data = mapped.read_region(previous, 0, region_from_bounds(lo, hi))
    trilinear.compose_field(residual, start, to_world, origin, to_index, index_origin,
                            np.asarray(data, dtype=np.float32), lo.astype(float), out)
    return out


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
    if not isinstance(previous, AffineTransform):
        previous = mapped.opened(previous, as_transform)
    numerator, denominator, out = _scratch(region_shape(chunk))
    residual = _blend_into(numerator, denominator, results, chunk, image_shape_zyx, factor)
    total = compose_on_grid(residual, chunk, field_grid, previous, out)
    for uri in destinations:
        ome_zarr.write_region(mapped.opened(uri, ome_zarr.open_image), 0, chunk, total)
    return {"voxels": int(np.prod(total.shape[1:])), "blocks": len(results)}


def reduce_chunks(
    parts: Sequence[tuple[Region, Sequence[BlockResult]]],
    field_grid: Grid,
    image_shape_zyx: Sequence[int],
    factor: float,
    previous,
    destinations: Sequence[str],
) -> dict:
    """`reduce_chunk` for each (chunk, the blocks that reach it) of a batch, in order;
    returns the counts summed, with how many chunks."""
    counts = [reduce_chunk(results, chunk, field_grid, image_shape_zyx, factor, previous,
                           destinations) for chunk, results in parts]
    return {"voxels": sum(c["voxels"] for c in counts),
            "blocks": sum(c["blocks"] for c in counts), "chunks": len(counts)}


def warm_up() -> None:
    """Load (or compile, the first time on a machine) the compiled loops of this step on
    tiny inputs of the types real chunks give them, so that a worker's first chunk does
    not pay for it."""
    grid = Grid((2, 2, 2), (1.0, 1.0, 1.0))
    chunk = region_from_bounds((0, 0, 0), (2, 2, 2))
    residual = np.zeros((3, 2, 2, 2), np.float32)
    numerator, denominator = residual.copy(), np.zeros((2, 2, 2), np.float32)
    block = tile((2, 2, 2), None, 0.0, (2, 2, 2), 1.0)[0]
    weights = axis_weights(block, chunk, (2, 2, 2), 1.0)
    # A residual's part is contiguous or not (a whole block or a slab of it), writable or
    # not (read whole, or mapped): each kind is a compiled variant of its own.
    read_only = residual.copy()
    read_only.flags.writeable = False
    for part in (residual, residual[:, :1], read_only, read_only[:, :1]):
        _accumulate(numerator, denominator, part, *weights, 0, 0, 0)
    _normalise(numerator, denominator)
    compose_on_grid(residual, chunk, grid, AffineTransform.identity())
    start, matrix, origin = np.zeros(3, np.int64), np.eye(3), np.zeros(3)
    trilinear.moved_index_bounds(residual, start, matrix, origin, matrix, origin)
    trilinear.compose_field(residual, start, matrix, origin, matrix, origin, residual, origin,
                            residual.copy())
    trilinear.sample(residual, np.zeros((3, 1)))


def field_identity(identity_of_inputs: str, results: Sequence[BlockResult]) -> str:
    """An identifier of a stage's field content, from what it was computed from: the
    stage's inputs and every block's outcome (residuals are named by their inputs). It
    keys the next stage's cache without hashing the field's voxels."""
    rows = sorted(
        (list(r.block.index), r.status, r.residual_uri or "") for r in results
    )
    payload = json.dumps([identity_of_inputs, rows]).encode()
    return hashlib.sha256(payload).hexdigest()[:32]
