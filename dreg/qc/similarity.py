"""Similarity of the fixed image and the moving image, before and after registration.

Measured on a coarse lattice: every s-th voxel of the field grid (s chosen so that the
lattice stays small), the images read from the pyramid level whose spacing matches the
lattice's. Before is the moving image through the initial transform; after is the
warped image (when OUT holds one made from this field) or the moving image through the
field. The metric is the registration's own, normalized mutual information, from joint
histograms over fixed intensity ranges, so that the histograms of any number of bricks
add up to the whole lattice's.
"""

from __future__ import annotations

import numpy as np

from dreg.grid import Grid, Region, components_to_vectors
from dreg.io import ome_zarr
from dreg.qc.sampling import inside_image, sample_image, through_affine
from dreg.registration.similarity import nmi_of_histogram

METRIC = "normalized_mutual_information"


def lattice_index(region: Region, stride: int) -> list[np.ndarray]:
    """Per axis, the indices of the field grid in `region` that are multiples of
    `stride`: the lattice's share of a brick."""
    return [np.arange(-(-s.start // stride) * stride, s.stop, stride) for s in region]


def joint_histogram(a: np.ndarray, b: np.ndarray, a_range, b_range, bins: int) -> np.ndarray:
    """Counts of (a, b) pairs over fixed ranges; values beyond a range count in its
    first or last bin."""
    a = np.clip(a, *a_range)
    b = np.clip(b, *b_range)
    joint, _, _ = np.histogram2d(a, b, bins=bins, range=[list(a_range), list(b_range)])
    return joint.astype(np.int64)


def brick_histograms(plan, u: np.ndarray, grown: Region, brick: Region
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The joint histograms (fixed by moving) before and after registration on the
    lattice points of one brick. `u` holds the field on `grown`, a box around `brick`."""
    axes = lattice_index(brick, plan.lattice_stride)
    empty = np.zeros((plan.bins, plan.bins), dtype=np.int64)
    if any(len(a) == 0 for a in axes):
        return empty, empty.copy()
    grid: Grid = plan.field_grid
    index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    points = grid.index_to_world(index)
    local = tuple(a - g.start for a, g in zip(axes, grown, strict=True))
    displacement = components_to_vectors(u[(slice(None), *np.ix_(*local))]).reshape(-1, 3)

    fixed = sample_image(ome_zarr.open_image(plan.fixed), plan.fixed_level, points)
    moving = ome_zarr.open_image(plan.moving)
    before = sample_image(moving, plan.moving_level, through_affine(plan.initial, points))
    moved = points + displacement
    if plan.warped:
        # The warped image holds 0 where x + u(x) left the moving image: those voxels
        # are outside, as they are when the moving image is sampled here.
        after = sample_image(ome_zarr.open_image(plan.warped), plan.warped_level, points)
        after[~inside_image(moving, plan.moving_level, moved)] = np.nan
    else:
        after = sample_image(moving, plan.moving_level, moved)
    # The same voxels before and after: those that both map inside the moving image.
    keep = np.isfinite(fixed) & np.isfinite(before) & np.isfinite(after)
    return tuple(joint_histogram(fixed[keep], values[keep], plan.fixed_range,
                                 plan.moving_range, plan.bins) for values in (before, after))


def similarity_summary(before: np.ndarray, after: np.ndarray, plan) -> dict:
    """What qc.json holds of the similarity: the metric's name, its value before and
    after (None when no lattice point mapped inside the moving image), and where it
    was measured."""
    points = int(before.sum())
    measured = points > 0
    return {
        "metric": METRIC,
        "before": nmi_of_histogram(before) if measured else None,
        "after": nmi_of_histogram(after) if measured else None,
        "points": points,
        "lattice_stride": plan.lattice_stride,
        "fixed_level": plan.fixed_level,
        "moving_level": plan.moving_level,
        "warped_level": plan.warped_level,
        "after_from": "warped image" if plan.warped else "moving image through the field",
        "before_from": "moving image through the initial transform",
    }
