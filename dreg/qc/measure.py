"""One brick of the field measured: det J chunk by chunk, and the similarity histograms
of the lattice points in it, from one read of the brick with its one-voxel halo."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dreg.field import open_field
from dreg.grid import Region, region_shape, region_to_list, relative_region
from dreg.io import ome_zarr
from dreg.qc.jacobian import JacobianTally, determinant, with_halo
from dreg.qc.plan import QcPlan
from dreg.qc.similarity import brick_histograms

FOLD_CHUNKS_LISTED = 20


@dataclass
class BrickMeasure:
    """The numbers of one brick (or of several merged): small, and they add up."""

    jacobian: JacobianTally = field(default_factory=JacobianTally)
    fold_chunks: list[dict] = field(default_factory=list)
    before: np.ndarray | None = None
    after: np.ndarray | None = None

    def merge(self, other: BrickMeasure) -> BrickMeasure:
        folds = sorted(self.fold_chunks + other.fold_chunks, key=lambda f: -f["voxels"])
        return BrickMeasure(self.jacobian.merge(other.jacobian), folds[:FOLD_CHUNKS_LISTED],
                            _add(self.before, other.before), _add(self.after, other.after))


def _add(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    return a if b is None else a + b


def measure_brick(plan: QcPlan, brick: Region) -> BrickMeasure:
    """det J over every field voxel of `brick`, tallied per chunk (the chunks with folds
    are named), and the similarity histograms of the brick's lattice points."""
    field_image = open_field(plan.field)
    grid = plan.field_grid
    grown, _ = with_halo(brick, grid.shape_zyx)
    u = ome_zarr.read_region(field_image, 0, grown)
    measure = BrickMeasure()
    for chunk in ome_zarr.chunk_regions(region_shape(brick), plan.field_chunks):
        chunk = tuple(slice(s.start + b.start, s.stop + b.start)
                      for s, b in zip(chunk, brick, strict=True))
        tally = JacobianTally.of(determinant(u, grid, relative_region(chunk, grown)))
        folds = []
        if tally.nonpositive:
            centre = grid.index_to_world(np.array([(s.start + s.stop - 1) / 2 for s in chunk]))
            folds = [{"region": region_to_list(chunk), "voxels": tally.nonpositive,
                      "centre_xyz": [round(float(v), 4) for v in centre]}]
        measure = measure.merge(BrickMeasure(tally, folds))
    before, after = brick_histograms(plan, u, grown, brick)
    return measure.merge(BrickMeasure(before=before, after=after))


def measure_bricks(plan: QcPlan, bricks: Sequence[Region]) -> BrickMeasure:
    """`measure_brick` for each of a batch of bricks, merged."""
    total = BrickMeasure()
    for brick in bricks:
        total = total.merge(measure_brick(plan, brick))
    return total
