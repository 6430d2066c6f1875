"""Cutting a grid's chunks into batches, one task run each.

A task run per chunk would cost Prefect's bookkeeping, about 0.2 CPU-s in all (worker,
flow and server; bench/README.md), for 10-100 ms of work. The warp, its pyramid, the
inverse, a stage's reduce and QC's bricks go in about BATCHES_PER_WORKER batches per
worker, at most MAX_BATCH_CHUNKS chunks each (a retried batch redoes at most that much),
never more than MAX_BATCHES (Prefect's server stalls at tens of thousands of task runs per
flow). A warp brick of up to 4 x 4 x 4 chunks needs at most 6**3 input chunks decoded at
a time (216 MiB of float32 chunks of 64**3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product

from dreg.grid import Region

BATCHES_PER_WORKER = 2
MIN_BATCH_CHUNKS = 4
MAX_BATCH_CHUNKS = 64
MAX_BATCHES = 2000


def chunk_batches(shape_zyx: Sequence[int], chunks_zyx: Sequence[int], workers: int,
                  batches_per_worker: int = BATCHES_PER_WORKER,
                  min_chunks: int = MIN_BATCH_CHUNKS,
                  max_chunks: int = MAX_BATCH_CHUNKS,
                  max_batches: int = MAX_BATCHES) -> list[list[int]]:
    """The chunks of a grid (their indices in `ome_zarr.chunk_regions`' C order) cut
    into batches, one task run each: bricks of neighbouring chunks, so that a batch
    decodes each input chunk its output chunks reach about once (`ChunkCache`).

    The brick starts as the whole chunk grid and its longest side is halved until there
    are at least `batches_per_worker` bricks per worker and a brick holds at most
    `max_chunks` chunks, but never below `min_chunks` (Prefect's cost per task run
    would show) unless the cap asks for it, nor into more than
    `max_batches` bricks (Prefect's server stalls at tens of thousands of task runs per
    flow). Bricks, and the chunks inside each, go in C order."""
    grid = [math.ceil(n / c) for n, c in zip(shape_zyx, chunks_zyx, strict=True)]
    brick = list(grid)

    def count(b: list[int]) -> int:
        return math.prod(math.ceil(g / e) for g, e in zip(grid, b, strict=True))

    while max(brick) > 1:
        axis = brick.index(max(brick))
        smaller = brick.copy()
        smaller[axis] = math.ceil(smaller[axis] / 2)
        too_big = math.prod(brick) > max_chunks
        too_few = count(brick) < max(workers, 1) * batches_per_worker
        if count(smaller) > max_batches or not (
                too_big or (too_few and math.prod(smaller) >= min_chunks)):
            break
        brick = smaller
    batches = []
    for corner in product(*(range(0, g, e) for g, e in zip(grid, brick, strict=True))):
        ranges = [range(a, min(a + e, g)) for a, e, g in zip(corner, brick, grid, strict=True)]
        batches.append([(k * grid[1] + j) * grid[2] + i for k, j, i in product(*ranges)])
    return batches


def chunk_region(shape_zyx: Sequence[int], chunks_zyx: Sequence[int], index: int) -> Region:
    """The region of chunk `index` in `ome_zarr.chunk_regions`' C order."""
    grid = [math.ceil(n / c) for n, c in zip(shape_zyx, chunks_zyx, strict=True)]
    k, rest = divmod(index, grid[1] * grid[2])
    j, i = divmod(rest, grid[2])
    return tuple(slice(a * c, min((a + 1) * c, n))
                 for a, c, n in zip((k, j, i), chunks_zyx, shape_zyx, strict=True))


def balanced_batches(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Indices of items of the given sizes cut into at most `count` batches of about
    equal total size: largest first into the lightest batch so far. Each batch's indices
    go in order, empty batches are dropped. (A grid's edge chunks are thin: cut into
    bricks, the batches holding them would be far lighter than the others, and on a few
    workers the run would wait for the heaviest.)"""
    count = max(1, min(count, len(sizes)))
    totals = [0] * count
    batches: list[list[int]] = [[] for _ in range(count)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = min(range(count), key=lambda b: (totals[b], b))
        batches[lightest].append(index)
        totals[lightest] += sizes[index]
    return [sorted(batch) for batch in batches if batch]


def region_batches(regions: Sequence[Region], workers: int) -> list[list[int]]:
    """Regions (chunks of a grid; their indices) cut into batches of about equal voxels
    (`balanced_batches`): about BATCHES_PER_WORKER per worker, at most MAX_BATCH_CHUNKS
    regions each, never more than MAX_BATCHES."""
    sizes = [math.prod(s.stop - s.start for s in region) for region in regions]
    count = max(max(workers, 1) * BATCHES_PER_WORKER, math.ceil(len(sizes) / MAX_BATCH_CHUNKS))
    return balanced_batches(sizes, min(count, MAX_BATCHES))
