"""The block grid of a stage: blocks of the fixed image padded by an overlap.

Blocks tile the fixed image's voxel grid at the stage's level. Each block is padded by
`overlap` times its size, split over both sides, and cropped at the image border. A
stage with no block size is one block covering the whole image. Each block also knows
its share of the stage's field grid (whose voxel j sits at fixed index j * factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np

from dreg.compiled import jit
from dreg.grid import Region, region_from_bounds


@dataclass(frozen=True)
class Block:
    """One block of a stage, in voxels of the fixed image at the stage's level.

    Attributes:
        index: position in the block grid (z, y, x).
        core: the block without padding.
        padded: the block with padding, cropped at the image border.
        ramp: per axis, the width over which blending weights fall to zero at a padded
            edge that has a neighbour (twice the padding; 0 means no ramp).
        field_box: the voxels of the stage's field grid that the padded block covers.
    """

    index: tuple[int, int, int]
    core: Region
    padded: Region
    ramp: tuple[float, float, float]
    field_box: Region

    @property
    def name(self) -> str:
        return "-".join(str(i) for i in self.index)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.padded)


def normalize_block_size(block_size, shape_zyx) -> tuple[int, int, int]:
    """A block size per axis; None means the whole image."""
    if block_size is None:
        return tuple(int(n) for n in shape_zyx)
    if isinstance(block_size, int | np.integer):
        block_size = (int(block_size),) * 3
    sizes = tuple(int(b) for b in block_size)
    return tuple(min(b, n) for b, n in zip(sizes, shape_zyx, strict=True))


def block_count(shape_zyx, block_size) -> int:
    """How many blocks `tile` cuts an image of `shape_zyx` voxels into."""
    sizes = normalize_block_size(block_size, shape_zyx)
    return math.prod(len(_axis_cores(int(n), b)) for n, b in zip(shape_zyx, sizes, strict=True))


def _axis_cores(n: int, size: int) -> list[tuple[int, int]]:
    """Cut [0, n) into cores of `size`; a remainder under half a block joins the last core."""
    starts = list(range(0, n, size))
    cores = [(s, min(s + size, n)) for s in starts]
    if len(cores) > 1 and cores[-1][1] - cores[-1][0] < size / 2:
        last = cores.pop()
        cores[-1] = (cores[-1][0], last[1])
    return cores


def _field_range(start: int, stop: int, n: int, field_n: int, factor: float) -> tuple[int, int]:
    """Field voxels j with start <= j * factor <= stop - 1; the border blocks reach the
    field grid's ends (which may lie a fraction of a field voxel outside the image)."""
    lo = 0 if start == 0 else math.ceil(start / factor - 1e-9)
    hi = field_n if stop == n else math.floor((stop - 1) / factor + 1e-9) + 1
    return lo, max(hi, lo + 1)


def tile(
    shape_zyx,
    block_size,
    overlap: float,
    field_shape_zyx,
    factor: float,
) -> list[Block]:
    """All blocks of a stage in C order of their grid index."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    size = normalize_block_size(block_size, shape_zyx)
    axis_cores = [_axis_cores(n, b) for n, b in zip(shape_zyx, size, strict=True)]
    pads = [int(round(overlap * b / 2)) for b in size]
    blocks = []
    for index in product(*(range(len(c)) for c in axis_cores)):
        core, padded, ramp, field_box = [], [], [], []
        for axis, i in enumerate(index):
            start, stop = axis_cores[axis][i]
            n, pad = shape_zyx[axis], pads[axis]
            lo, hi = max(start - pad, 0), min(stop + pad, n)
            core.append((start, stop))
            padded.append((lo, hi))
            ramp.append(float(2 * pad))
            field_box.append(_field_range(lo, hi, n, field_shape_zyx[axis], factor))
        blocks.append(
            Block(
                index=tuple(index),
                core=region_from_bounds(*zip(*core, strict=True)),
                padded=region_from_bounds(*zip(*padded, strict=True)),
                ramp=tuple(ramp),
                field_box=region_from_bounds(*zip(*field_box, strict=True)),
            )
        )
    return blocks


@jit
def _ramp(start: int, stop: int, factor: float, lo: int, hi: int, ramp: float, rises: bool,
          falls: bool) -> np.ndarray:
    """One axis's weights at field voxels start..stop-1: min(1, (t - lo) / ramp) where it
    rises, min(.., (hi - t) / ramp) where it falls, clipped to [0, 1]; t = j * factor."""
    weights = np.empty(stop - start)
    for k in range(stop - start):
        t = float(start + k) * factor  # fixed continuous index
        w = 1.0
        if rises:
            w = min(w, (t - lo) / ramp)
        if falls:
            w = min(w, (hi - t) / ramp)
        weights[k] = min(max(w, 0.0), 1.0)
    return weights


def axis_weights(block: Block, box: Region, image_shape_zyx, factor: float) -> list[np.ndarray]:
    """The blending weight of a block along each axis (z, y, x) at the field voxels of
    `box` (a part of its field box): the weight at a voxel is their product.

    Along each axis the weight rises linearly from 0 at a padded edge that has a
    neighbour to 1 at twice the padding inside it, so that two overlapping neighbours'
    weights sum to one; at the image border (no neighbour) it stays 1. (Compiled: the
    reduce step asks for them once per block and field chunk.)
    """
    weights = []
    for axis, (padded, part) in enumerate(zip(block.padded, box, strict=True)):
        lo, hi, ramp = padded.start, padded.stop, block.ramp[axis]
        weights.append(_ramp(part.start, part.stop, float(factor), lo, hi, ramp,
                             ramp > 0 and lo > 0, ramp > 0 and hi < image_shape_zyx[axis]))
    return weights


def blend_weights(block: Block, box: Region, image_shape_zyx, factor: float) -> np.ndarray:
    """Blending weight of a block at the field voxels of `box` (a part of its field box),
    the product of its `axis_weights`."""
    wz, wy, wx = axis_weights(block, box, image_shape_zyx, factor)
    return wz[:, None, None] * wy[None, :, None] * wx[None, None, :]

