"""Multiscale pyramids, built out of core: each level from the one before, chunk by chunk.

Level k+1 halves level k along each axis: Gaussian smoothing (sigma of one input voxel)
then taking every second voxel. Voxel j of level k+1 sits exactly on voxel 2j of level k,
so the origin is unchanged and the spacing doubles.

Label maps use the "nearest" method instead: every second voxel, no smoothing, since a
smoothed label map holds values that are no label at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from dreg.grid import Grid, Region
from dreg.io import completion, ome_zarr
from dreg.io.chunk_cache import ChunkCache

SMOOTHING_SIGMA = 1.0
HALO = 4  # input voxels read beyond a chunk, 4 sigma
COARSEST_LONGEST_AXIS = 64
GAUSSIAN = "gaussian"
NEAREST = "nearest"
DOWNSAMPLE_METHODS = (GAUSSIAN, NEAREST)


def pyramid_grids(grid: Grid, coarsest_longest_axis: int = COARSEST_LONGEST_AXIS) -> list[Grid]:
    """The grids of every level, finest first, down to one whose longest axis is small."""
    grids = [grid]
    while max(grids[-1].shape_zyx) > coarsest_longest_axis:
        previous = grids[-1]
        shape = tuple(math.ceil(n / 2) for n in previous.shape_zyx)
        grids.append(previous.coarsened(2.0, shape_zyx=shape))
    return grids


def downsample_region(
    image: ome_zarr.OmeZarrImage, source_level: int, target_region: Region,
    method: str = GAUSSIAN, read: Callable[[Region], np.ndarray] | None = None,
) -> np.ndarray:
    """The voxels of `target_region` at level source_level + 1, from the source level.

    `method` is "gaussian" (smooth, then take every second voxel) or "nearest" (voxel j
    of the coarser level is voxel 2j of the source level, values untouched: labels).
    `read` returns a box of the source level (default `ome_zarr.read_region`; a batch
    passes a `ChunkCache`'s).
    """
    if method not in DOWNSAMPLE_METHODS:
        raise ValueError(f"method must be one of {DOWNSAMPLE_METHODS}, got {method!r}")
    if read is None:
        def read(box: Region) -> np.ndarray:
            return ome_zarr.read_region(image, source_level, box)
    if method == NEAREST:
        return _subsample_region(image, source_level, target_region, read)
    source_shape = image.level(source_level).grid.shape_zyx
    read_start = [max(2 * s.start - HALO, 0) for s in target_region]
    read_stop = [
        min(2 * (s.stop - 1) + 1 + HALO, n)
        for s, n in zip(target_region, source_shape, strict=True)
    ]
    box = tuple(slice(a, b) for a, b in zip(read_start, read_stop, strict=True))
    data = read(box).astype(np.float32, copy=False)
    vector = image.components is not None
    # The Gaussian is separable: smooth along one axis, keep every second voxel along it,
    # then go on to the next axis. Same values as smoothing in 3D then subsampling (each
    # 1D pass acts within lines of that axis only), with less work and smaller arrays.
    first_spatial = 1 if vector else 0
    for k, (s, a) in enumerate(zip(target_region, read_start, strict=True)):
        axis = first_spatial + k
        data = ndimage.gaussian_filter1d(
            data, SMOOTHING_SIGMA, axis=axis, mode="nearest", truncate=HALO / SMOOTHING_SIGMA
        )
        take = [slice(None)] * data.ndim
        take[axis] = slice(2 * s.start - a, 2 * (s.stop - 1) - a + 1, 2)
        data = data[tuple(take)]
    out = data
    dtype = np.dtype(image.level(source_level + 1).dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(dtype)


def _subsample_region(
    image: ome_zarr.OmeZarrImage, source_level: int, target_region: Region,
    read: Callable[[Region], np.ndarray],
) -> np.ndarray:
    """Every second voxel of the source level: the target region's voxels, unsmoothed."""
    # Read only from voxel 2 * start to voxel 2 * (stop - 1): the span the target covers.
    data = read(tuple(slice(2 * s.start, 2 * (s.stop - 1) + 1) for s in target_region))
    every_second = (slice(None, None, 2),) * 3
    if image.components is not None:
        every_second = (slice(None), *every_second)
    dtype = np.dtype(image.level(source_level + 1).dtype)
    return np.ascontiguousarray(data[every_second]).astype(dtype, copy=False)


def build_pyramid(
    image: ome_zarr.OmeZarrImage, workers: int = 2, method: str = GAUSSIAN
) -> None:
    """Fill levels 1.. of an image whose level 0 is written, one output chunk at a time.

    `method` is passed on to `downsample_region` ("nearest" for label maps)."""
    if method not in DOWNSAMPLE_METHODS:
        raise ValueError(f"method must be one of {DOWNSAMPLE_METHODS}, got {method!r}")
    for level in range(1, len(image.levels)):
        ome_zarr.write_level_by_chunks(
            image,
            level,
            lambda region, source=level - 1: downsample_region(
                image, source, region, method=method
            ),
            workers=workers,
        )


def downsample_batch(uri: str, level: int, chunks: Sequence[tuple[str, Region]],
                     method: str, token: str) -> list[int]:
    """Write a batch of chunks (named regions) of pyramid level `level` of the image at
    `uri` from the level above, each under its own chunk mark (`completion.once` with the
    output's `token`): a retried or resumed batch skips the chunks it had written. The
    source level's chunks are decoded once for the batch (`ChunkCache`). Returns each
    chunk's voxel count, in order."""
    image = ome_zarr.open_image(uri)
    cache = ChunkCache(image, level - 1)
    array = ome_zarr.open_level(image, level, mode="r+")

    def write(region: Region) -> dict:
        data = downsample_region(image, level - 1, region, method=method,
                                 read=cache.read_region)
        ome_zarr.write_region(image, level, region, data, array)
        return {"voxels": int(data.size)}

    return [int(completion.once(uri, token, name, lambda r=region: write(r))["voxels"])
            for name, region in chunks]
