"""The inverse of a registration's displacement field, one output chunk at a time.

The forward field u maps fixed to moving: y = x + u(x). Its inverse v lives on the moving
image's grid and maps moving to fixed: x = y + v(y). For each moving point y we solve
x + u(x) = y by fixed-point iteration x_{k+1} = y - u(x_k) from x_0 = y - u(y), reading
the forward field only around the iterates (one box, held in memory, grown only when the
iterates leave it).

Choices (DESIGN.md, "Using the result"):
- **Damping.** The step is x_{k+1} = x_k - s_k r_k with the residual r_k = x_k + u(x_k) - y;
  s = 1 is the plain iteration. A step that does not shrink |r| is rejected and s halves
  for that point; an accepted step doubles s back toward 1. Plain iteration converges
  where u is a contraction; backtracking keeps the points where it would oscillate
  (|J_u| near or above 1) converging as long as x + u(x) is locally invertible.
- **No preimage is NaN, never zero.** A point gets NaN when its final x lies outside the
  forward field's grid by more than half a field voxel (the preimage would leave the
  fixed domain), or when |x + u(x) - y| is still above the tolerance (in field voxels)
  after the iterations. Outside its grid the field holds its border value, as
  `sample_field` does, so the iteration is defined everywhere and only the end decides.
- **Round-trip statistics.** Each chunk reports |y + v(y) + u(y + v(y)) - y| with u
  sampled afresh at the stored (float32) v, and a histogram on fixed log-spaced bins so
  that chunk statistics merge (`merge_stats`) into overall ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from dreg.errors import InputError
from dreg.field import (
    FIELD_CHUNK,
    MOVING_TO_FIXED,
    create_field,
    inversion,
    open_field,
    sample_field,
)
from dreg.grid import (
    Grid,
    Region,
    components_to_vectors,
    region_from_bounds,
    region_shape,
    region_to_list,
    xyz_to_zyx,
)
from dreg.io import completion, mapped, ome_zarr

ITERATIONS = 50
TOLERANCE_VOXELS = 1e-3
# Field voxels read beyond the iterates' bounding box, so that the small moves of later
# iterates stay inside the box held in memory.
MARGIN_VOXELS = 4
# Iterate until the residual is this fraction of the tolerance: the acceptance test and
# the round-trip check then sit well below the tolerance, not on it.
TARGET_FRACTION = 0.01
# A point whose step was halved this far without progress has stalled (float32 noise of
# the field, or a fold with no nearby preimage); its residual decides.
MIN_STEP = 1.0 / 64
# Round-trip error histogram (physical units): an underflow bin [0, 1e-6), ten bins a
# decade up to 1e3, and an overflow bin [1e3, inf). Fixed, so chunk histograms add up.
HISTOGRAM_EDGES = np.concatenate([[0.0], np.logspace(-6, 3, 91), [np.inf]])


# ----------------------------------------------------------------------------- grids


def field_factor(field: ome_zarr.OmeZarrImage) -> float:
    """How many fixed-image voxels one voxel of the forward field's grid spans (usually
    2): the field grid's spacing over the fixed image's level-0 spacing."""
    fixed = field.attributes.get("fixed") or {}
    if "spacing_xyz" not in fixed:
        raise InputError(f"{field.uri}: the field does not record the fixed image's grid "
                         "(dreg.fixed), so its coarsening factor is unknown")
    factor = field.levels[0].grid.spacing_xyz[0] / Grid.from_dict(fixed).spacing_xyz[0]
    # The factor is an integer by construction; snap away the float noise of the ratio.
    nearest = round(factor)
    return float(nearest) if nearest >= 1 and abs(factor - nearest) < 1e-6 * factor else factor


def inverse_grid(field: ome_zarr.OmeZarrImage, moving_grid: Grid) -> Grid:
    """The inverse field's grid: the moving image's full-resolution grid coarsened by the
    forward field's factor relative to the fixed image."""
    return moving_grid.coarsened(field_factor(field))


# ----------------------------------------------------------------------------- the field in memory


class FieldWindow:
    """A box of a displacement field held in memory, sampled trilinearly, re-read (larger)
    only when points need voxels outside it.

    Sampling holds the border value outside the field's grid, exactly as `sample_field`.
    `reads` counts the reads from storage.
    """

    def __init__(self, field: ome_zarr.OmeZarrImage, margin_voxels: int = MARGIN_VOXELS):
        self.field = field
        self.grid = field.levels[0].grid
        self.shape = np.array(self.grid.shape_zyx)
        self.margin = int(margin_voxels)
        self.world_to_step = np.linalg.inv(self.grid.index_to_world_matrix)
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None
        self.data: np.ndarray | None = None
        self.reads = 0

    def index(self, points_xyz: np.ndarray) -> np.ndarray:
        """Continuous (z, y, x) indices of world points (N, 3), as (3, N) rows."""
        return np.ascontiguousarray(self.grid.world_to_index(points_xyz).T)

    def voxel_lengths(self, vectors_xyz: np.ndarray) -> np.ndarray:
        """Lengths of world vectors (N, 3) measured in the field grid's voxels."""
        return np.linalg.norm(vectors_xyz @ self.world_to_step.T, axis=-1)

    def voxel_components(self, vectors_xyz: np.ndarray) -> np.ndarray:
        """World vectors (N, 3) as index steps (N, 3) in (z, y, x) order."""
        return xyz_to_zyx(vectors_xyz @ self.world_to_step.T)

    def _needed(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The voxels trilinear interpolation weighs; outside the grid, its border voxels.
        # NaN points (from a NaN in the field) need nothing: they fail the tolerance.
        finite = index[:, np.isfinite(index).all(axis=0)]
        if finite.size == 0:
            return np.zeros(3, dtype=int), np.ones(3, dtype=int)
        lo = np.clip(np.floor(finite.min(axis=1)).astype(int), 0, self.shape - 1)
        hi = np.clip(np.ceil(finite.max(axis=1)).astype(int) + 1, lo + 1, self.shape)
        return lo, hi

    def ensure(self, index: np.ndarray, extra_voxels=0) -> None:
        """Hold every voxel that points at `index` (3, N) need; if some are missing, read
        the union of the current box and the needed one, grown by the margin plus
        `extra_voxels` (scalar or per z, y, x axis) to anticipate further moves."""
        lo, hi = self._needed(index)
        if self.data is not None and np.all(lo >= self.lo) and np.all(hi <= self.hi):
            return
        grow = self.margin + np.ceil(np.asarray(extra_voxels, dtype=float)).astype(int)
        lo = np.clip(lo - grow, 0, self.shape - 1)
        hi = np.clip(hi + grow, lo + 1, self.shape)
        if self.data is not None:
            lo, hi = np.minimum(lo, self.lo), np.maximum(hi, self.hi)
        # float64 once: the iteration's residuals go well below float32's resolution of
        # the interpolated values otherwise.
        self.data = ome_zarr.read_region(self.field, 0, region_from_bounds(lo, hi)).astype(
            np.float64)
        self.lo, self.hi = lo, hi
        self.reads += 1

    def sample(self, points_xyz: np.ndarray, extra_voxels=0) -> np.ndarray:
        """u at world points (N, 3) as world (x, y, z) vectors (N, 3), float64."""
        index = self.index(points_xyz)
        self.ensure(index, extra_voxels)
        index -= self.lo[:, None]
        components = np.stack([ndimage.map_coordinates(self.data[c], index, order=1,
                                                       mode="nearest") for c in range(3)])
        return components_to_vectors(components)

    def inside(self, points_xyz: np.ndarray) -> np.ndarray:
        """Whether points (N, 3) lie within half a voxel of the field's grid: the fixed
        domain the field covers."""
        index = self.index(points_xyz)
        return np.all((index >= -0.5) & (index <= self.shape[:, None] - 0.5), axis=0)


# ----------------------------------------------------------------------------- points


def _iterate(window: FieldWindow, y: np.ndarray, x: np.ndarray, iterations: int,
             target_voxels: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Damped fixed-point iteration for x + u(x) = y from x (updated in place).

    Returns x, the residual vectors r = x + u(x) - y and their lengths in field voxels.
    """
    r = x + window.sample(x) - y
    length = window.voxel_lengths(r)
    step = np.ones(len(y))
    active = ~(length <= target_voxels)  # NaN residuals (a NaN field) stay active, then fail
    for _ in range(iterations):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        candidate = x[idx] - step[idx, None] * r[idx]
        # The next move is about as long as this one: read that much beyond, if at all.
        extra = np.nan_to_num(np.abs(window.voxel_components(r[idx])).max(axis=0))
        r_candidate = candidate + window.sample(candidate, extra) - y[idx]
        length_candidate = window.voxel_lengths(r_candidate)
        better = length_candidate < length[idx]
        accepted, rejected = idx[better], idx[~better]
        x[accepted] = candidate[better]
        r[accepted] = r_candidate[better]
        length[accepted] = length_candidate[better]
        step[accepted] = np.minimum(1.0, 2 * step[accepted])
        step[rejected] *= 0.5
        active[accepted[length[accepted] <= target_voxels]] = False
        active[rejected[step[rejected] < MIN_STEP]] = False
    return x, r, length


def _invert_in_window(window: FieldWindow, points_xyz: np.ndarray, iterations: int,
                      tolerance_voxels: float) -> tuple[np.ndarray, np.ndarray]:
    """`invert_points` with the forward field read through `window`."""
    y = np.asarray(points_xyz, dtype=float).reshape(-1, 3)
    if len(y) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    # u(y) is needed only to start from; it reads the box around y, not the iterates'.
    u_y = sample_field(window.field, y).astype(float)
    x = y - u_y
    # The iterates spread from x_0 by |u(x_k) - u(y)|; the variation of u across the
    # points is the estimate at hand before anything around x_0 is read.
    spread = np.ptp(window.voxel_components(u_y), axis=0)
    window.ensure(window.index(x), np.nan_to_num(spread))
    x, r, length = _iterate(window, y, x, iterations, TARGET_FRACTION * tolerance_voxels)
    valid = (length <= tolerance_voxels) & window.inside(x)
    v = np.where(valid[:, None], x - y, np.nan)
    residual = np.where(valid, np.linalg.norm(r, axis=-1), np.nan)
    return v, residual


def invert_points(
    field: ome_zarr.OmeZarrImage,
    points_xyz: np.ndarray,
    iterations: int = ITERATIONS,
    tolerance_voxels: float = TOLERANCE_VOXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """The inverse displacement v at moving-space world points y (N, 3): x = y + v solves
    x + u(x) = y for the forward field u.

    Reads the forward field only around the points: the box the iterates need, once,
    re-read larger only if iterates leave it. Returns v (N, 3) as world (x, y, z) vectors
    and the residual |x + u(x) - y| (N,) in physical units; both NaN where y has no
    preimage in the fixed domain (see the module docstring).
    """
    return _invert_in_window(FieldWindow(field), points_xyz, iterations, tolerance_voxels)


# ----------------------------------------------------------------------------- statistics


def round_trip_stats(errors: np.ndarray) -> dict:
    """Statistics of round-trip errors (physical units; NaN where there is no inverse):
    voxels, nan, max, rms, p99 (exact), sum_squares and the fixed-bin histogram.
    max, rms and p99 are None when no voxel has an inverse."""
    errors = np.asarray(errors, dtype=float).ravel()
    finite = errors[~np.isnan(errors)]
    counts, _ = np.histogram(finite, bins=HISTOGRAM_EDGES)
    sum_squares = float(np.sum(finite**2))
    empty = finite.size == 0
    return {
        "voxels": int(errors.size),
        "nan": int(errors.size - finite.size),
        "max": None if empty else float(finite.max()),
        "rms": None if empty else float(np.sqrt(sum_squares / finite.size)),
        "p99": None if empty else float(np.percentile(finite, 99)),
        "sum_squares": sum_squares,
        "histogram": [int(c) for c in counts],
    }


def _histogram_quantile(counts: np.ndarray, q: float, maximum: float) -> float:
    """The upper edge of the bin holding quantile q (capped by the maximum, which also
    stands for the overflow bin's infinite edge)."""
    cumulative = np.cumsum(counts)
    k = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
    return float(min(HISTOGRAM_EDGES[k + 1], maximum))


def merge_stats(chunks: Sequence[dict]) -> dict:
    """Overall round-trip statistics from per-chunk ones: voxels, nan, max and rms are
    exact (rms from the sums of squares); p99 is the upper edge of the merged histogram's
    bin that holds it, so within one bin of the exact value."""
    voxels = sum(c["voxels"] for c in chunks)
    nan = sum(c["nan"] for c in chunks)
    counts = np.zeros(len(HISTOGRAM_EDGES) - 1, dtype=np.int64)
    for chunk in chunks:
        counts += np.asarray(chunk["histogram"], dtype=np.int64)
    # Older chunk records without sum_squares still merge: rms² · count is the same sum.
    sum_squares = sum(c.get("sum_squares", (c["rms"] or 0.0) ** 2 * (c["voxels"] - c["nan"]))
                      for c in chunks)
    valid = voxels - nan
    maxima = [c["max"] for c in chunks if c["max"] is not None]
    maximum = max(maxima) if maxima else None
    return {
        "voxels": voxels,
        "nan": nan,
        "max": maximum,
        "rms": float(np.sqrt(sum_squares / valid)) if valid else None,
        "p99": _histogram_quantile(counts, 0.99, maximum) if valid else None,
        "sum_squares": float(sum_squares),
        "histogram": [int(c) for c in counts],
    }


# ----------------------------------------------------------------------------- regions


def _region_field_box(field_grid: Grid, grid: Grid, region: Region) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """The field voxels (lo, hi) that sampling u at the region's own points needs: the
    corners' indices bound them, the map from one grid to the other being affine."""
    corners = np.array([[s.start if pick == 0 else s.stop - 1 for s, pick in zip(
        region, picks, strict=True)] for picks in np.ndindex(2, 2, 2)], dtype=float)
    index = field_grid.world_to_index(grid.index_to_world(corners))
    shape = np.array(field_grid.shape_zyx)
    lo = np.clip(np.floor(index.min(axis=0)).astype(int), 0, shape - 1)
    hi = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, lo + 1, shape)
    return lo, hi


def _preimage_box(data: np.ndarray, to_index: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  margin: int, field_shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The field box to hold for points whose own voxels are lo..hi, when the field
    around them holds `data` (c, z, y, x): a preimage x = y - u(x) lies about -u away,
    so the box spans lo..hi and lo..hi moved by -u for every u found there (a large
    translation moves the box, it does not grow it on every side), plus `margin`."""
    # The range of each world component (x, y, z; NaN ignored), then of the index steps
    # (i, j, k) they make, by interval arithmetic (exact on axis-aligned grids, a little
    # wider on oblique ones), in (z, y, x) order.
    flat = data[::-1].reshape(3, -1)
    least = np.nan_to_num(np.fmin.reduce(flat, axis=1))
    most = np.nan_to_num(np.fmax.reduce(flat, axis=1))
    positive, negative = np.maximum(to_index, 0), np.minimum(to_index, 0)
    low = np.floor(positive @ least + negative @ most)[::-1].astype(int)
    high = np.ceil(positive @ most + negative @ least)[::-1].astype(int)
    box_lo = np.clip(np.minimum(lo, lo - high) - margin, 0, field_shape - 1)
    box_hi = np.clip(np.maximum(hi, hi - low) + margin, box_lo + 1, field_shape)
    return box_lo, box_hi


def invert_region(
    field: ome_zarr.OmeZarrImage,
    grid: Grid,
    region: Region,
    iterations: int = ITERATIONS,
    tolerance_voxels: float = TOLERANCE_VOXELS,
    margin_voxels: int = MARGIN_VOXELS,
) -> tuple[np.ndarray, dict]:
    """The inverse on one region of the inverse grid `grid`.

    Returns v as (3, z, y, x) float32 world (z, y, x) components, NaN where there is no
    preimage, and the round-trip statistics (`round_trip_stats`) of
    |y + v(y) + u(y + v(y)) - y|, with u sampled anew at the stored v, plus
    "field_reads": how many boxes of the field were read, "field_box_voxels": the voxels
    of the last (largest) one, and "reruns": how many times the loop ran again because
    an iterate had left the box.

    One compiled loop over the region's voxels (`dreg.field.inversion.invert_box`), each
    iterating on its own as `invert_points` does, with the same arithmetic: the same
    inverse (bit for bit on axis-aligned grids). It reads one box of the field: the
    region's own box and that box moved by minus the displacements found around it,
    plus `margin_voxels` (`_preimage_box`); should an iterate leave it, a larger box is
    read and the loop runs again.
    """
    field_grid = field.levels[0].grid
    field_shape = np.array(field_grid.shape_zyx, dtype=np.int64)
    lo, hi = _region_field_box(field_grid, grid, region)
    to_index = np.linalg.inv(field_grid.index_to_world_matrix)
    # A first box with room for moves of a few voxels, which is usually all it takes; if
    # the displacements found in it reach further, the box to hold is read anew.
    guess = 2 * margin_voxels
    box_lo = np.clip(lo - guess, 0, field_shape - 1)
    box_hi = np.clip(hi + guess, box_lo + 1, field_shape)
    data = _read_box(field, box_lo, box_hi)
    reads, reruns = 1, 0
    wanted_lo, wanted_hi = _preimage_box(data, to_index, lo, hi, margin_voxels, field_shape)
    if np.any(wanted_lo < box_lo) or np.any(wanted_hi > box_hi):
        box_lo, box_hi = wanted_lo, wanted_hi
        data = _read_box(field, box_lo, box_hi)
        reads += 1
    start = np.array([s.start for s in region], dtype=np.int64)
    shape = np.array(region_shape(region), dtype=np.int64)
    v = np.empty((3, *shape), dtype=np.float32)
    errors = np.empty(tuple(shape), dtype=np.float64)
    while True:
        escaped, need = inversion.invert_box(
            start, shape, grid.index_to_world_matrix, np.asarray(grid.origin_xyz, dtype=float),
            data, np.concatenate([box_lo, box_hi]).astype(np.int64), field_shape, to_index,
            np.asarray(field_grid.origin_xyz, dtype=float), int(iterations),
            TARGET_FRACTION * tolerance_voxels, float(tolerance_voxels), MIN_STEP, v, errors)
        if escaped == 0:
            break
        # Some iterate left the box: add what those samples needed, with a margin.
        box_lo = np.clip(np.minimum(box_lo, need[:3] - margin_voxels), 0, field_shape - 1)
        box_hi = np.clip(np.maximum(box_hi, need[3:] + margin_voxels), box_lo + 1, field_shape)
        data = _read_box(field, box_lo, box_hi)
        reads += 1
        reruns += 1
    return v, {**round_trip_stats(errors), "field_reads": reads, "reruns": reruns,
               "field_box_voxels": int(np.prod(box_hi - box_lo))}


def warm_up() -> None:
    """Load (or compile) the compiled inversion loop in this process: a second or so once
    per process, from Numba's on-disk cache, else a few seconds to compile."""
    data = np.zeros((3, 2, 2, 2))
    grid = np.eye(3)
    inversion.invert_box(np.zeros(3, np.int64), np.ones(3, np.int64), grid, np.zeros(3), data,
                         np.array([0, 0, 0, 2, 2, 2], np.int64), np.full(3, 2, np.int64), grid,
                         np.zeros(3), 1, 1e-5, 1e-3, MIN_STEP,
                         np.empty((3, 1, 1, 1), np.float32), np.empty((1, 1, 1)))


def _read_box(field: ome_zarr.OmeZarrImage, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A box of the field (c, z, y, x) in float64, as the iteration samples it (the
    iteration's residuals go well below float32's resolution of the values otherwise)."""
    return np.asarray(mapped.read_region(field, 0, region_from_bounds(lo, hi)),
                      dtype=np.float64)


def create_inverse(
    uri: str,
    field: ome_zarr.OmeZarrImage,
    moving_grid: Grid,
    moving_uri: str,
    chunks: int | Sequence[int] = FIELD_CHUNK,
    overwrite: bool = False,
) -> ome_zarr.OmeZarrImage:
    """An empty inverse field (moving_to_fixed) on `inverse_grid`, to be written chunk by
    chunk with `invert_chunk`."""
    fixed = {"uri": (field.attributes.get("fixed") or {}).get("uri")}
    # Both fields' displacements are in the one physical unit of the two images' space.
    unit = getattr(field, "unit", None)
    if unit:
        fixed["unit"] = unit
    return create_field(
        uri,
        inverse_grid(field, moving_grid),
        fixed=fixed,
        moving_uri=moving_uri,
        chunks=chunks,
        overwrite=overwrite,
        mapping=MOVING_TO_FIXED,
        moving_grid=moving_grid,
        # An unwritten chunk must read as "no inverse known", never as a zero displacement.
        fill_value=float("nan"),
    )


def _as_region(region) -> Region:
    """A Region from itself or from its JSON form [[start, stop], ...]."""
    if all(isinstance(s, slice) for s in region):
        return tuple(region)
    return region_from_bounds([a for a, _ in region], [b for _, b in region])


def invert_chunk(
    field_uri: str,
    inverse_uri: str,
    region: Region | Sequence[Sequence[int]],
    iterations: int = ITERATIONS,
    tolerance_voxels: float = TOLERANCE_VOXELS,
) -> dict:
    """Compute and write the inverse on one region (whole chunks) of the inverse field.

    Returns the region's round-trip statistics plus "region" as [[start, stop], ...].
    """
    return _write_chunk(open_field(field_uri), open_field(inverse_uri, mapping=MOVING_TO_FIXED),
                        _as_region(region), iterations, tolerance_voxels)


def _write_chunk(field: ome_zarr.OmeZarrImage, inverse: ome_zarr.OmeZarrImage, region: Region,
                 iterations: int, tolerance_voxels: float) -> dict:
    v, stats = invert_region(field, inverse.levels[0].grid, region, iterations,
                             tolerance_voxels)
    ome_zarr.write_region(inverse, 0, region, v)
    return {**stats, "region": region_to_list(region)}


def invert_batch(
    field_uri: str,
    inverse_uri: str,
    chunks: Sequence[tuple[str, Region | Sequence[Sequence[int]]]],
    token: str,
    iterations: int = ITERATIONS,
    tolerance_voxels: float = TOLERANCE_VOXELS,
) -> list[dict]:
    """`invert_chunk` for a batch of chunks (named regions) of the inverse, each under
    its own chunk mark (`completion.once` with the inverse's `token`): a retried or
    resumed batch skips the chunks it had written. The fields are opened once for the
    batch. Returns each chunk's result, in order."""
    field = open_field(field_uri)
    inverse = open_field(inverse_uri, mapping=MOVING_TO_FIXED)
    results = []
    for name, region in chunks:
        def compute(region: Region = _as_region(region)) -> dict:  # noqa: B008 (bound now)
            return _write_chunk(field, inverse, region, iterations, tolerance_voxels)

        results.append(completion.once(inverse_uri, token, name, compute))
    return results
