"""Accuracy of a displacement field against a known truth, computed chunk by chunk."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dreg.field import open_field, sample_field
from dreg.grid import components_to_vectors
from dreg.io import ome_zarr


def chunk_errors(field_uri: str, truth_uri: str,
                 margin: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """|u - u_true| and |u_true| in voxels of the truth's grid, one field chunk at a time
    (flat arrays), over the field's voxels at least `margin` voxels from its border."""
    estimate, truth = open_field(field_uri), open_field(truth_uri)
    grid = estimate.levels[0].grid
    to_voxels = np.linalg.inv(truth.levels[0].grid.index_to_world_matrix)
    interior = tuple(slice(margin, n - margin) for n in grid.shape_zyx)
    for region in ome_zarr.chunk_regions(grid.shape_zyx, estimate.levels[0].chunks_zyx):
        inner = tuple(slice(max(r.start, i.start), min(r.stop, i.stop))
                      for r, i in zip(region, interior, strict=True))
        if any(s.start >= s.stop for s in inner):
            continue
        u = components_to_vectors(ome_zarr.read_region(estimate, 0, inner))
        u_true = sample_field(truth, grid.region_points(inner))
        yield (np.linalg.norm((u - u_true) @ to_voxels.T, axis=-1).ravel(),
               np.linalg.norm(u_true @ to_voxels.T, axis=-1).ravel())


def field_error(field_uri: str, truth_uri: str, margin: int = 2) -> dict:
    """RMS and 95th percentile of |u - u_true| in voxels of the truth's grid, over the
    field's voxels at least `margin` voxels from its border; and the same of |u_true|
    (the error before registration, against identity). Holds every voxel's error: for
    fields of up to a few hundred million voxels."""
    errors, befores = zip(*chunk_errors(field_uri, truth_uri, margin), strict=True)
    error, before = np.concatenate(errors), np.concatenate(befores)
    return {
        "rms_before": float(np.sqrt(np.mean(before**2))),
        "rms_after": float(np.sqrt(np.mean(error**2))),
        "p95_after": float(np.percentile(error, 95)),
        "max_after": float(error.max()),
    }
