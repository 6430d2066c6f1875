"""Trilinear sampling of (c, z, y, x) data that holds the border value outside it,
compiled with Numba.

The arithmetic is that of ``scipy.ndimage.map_coordinates(order=1, mode="nearest")``:
the weights of an axis are ``w0 = 1 - t`` and ``w1 = 1 - w0`` (t the fraction past the
lower voxel), a voxel outside the data is replaced by the border voxel, and the eight
corners are summed in float64 in C order, each as ((value * w_z) * w_y) * w_x, then
rounded to float32. So `sample` gives the same bits as SciPy for the same coordinates
(NaN where SciPy gives NaN), in one pass over the points for all components instead of
one per component.

`compose_on_grid` is the reduce step's composition u(x) = r(x) + u_prev(x + r(x)) fused
into one loop over a chunk of the field grid: it computes each voxel's world point,
moves it by the residual, maps it into the previous field's index space and samples
there, without building the (z, y, x, 3) arrays of points that NumPy would need.
"""

from __future__ import annotations

import math

import numpy as np

from dreg.compiled import jit


@jit(inline="always")
def _axis(x, n):
    """Lower and upper voxel and their weights along one axis of n voxels, as SciPy's
    order-1 "nearest" mode takes them: the weights from the coordinate itself, each of
    the two voxels moved onto the border when it lies outside. (Beyond the border both
    are the border voxel and the weights sum to one: its value is held.)"""
    x = min(max(x, -2.0), n + 1.0)  # further out changes nothing, and keeps int() small
    floor = math.floor(x)
    w0 = 1.0 - (x - floor)
    i0 = int(floor)
    return min(max(i0, 0), n - 1), min(max(i0 + 1, 0), n - 1), w0, 1.0 - w0


@jit(inline="always")
def _corners(values, z0, z1, y0, y1, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1):
    """The trilinear sum at one point of one component, in SciPy's order."""
    t = 0.0
    t += values[z0, y0, x0] * wz0 * wy0 * wx0
    t += values[z0, y0, x1] * wz0 * wy0 * wx1
    t += values[z0, y1, x0] * wz0 * wy1 * wx0
    t += values[z0, y1, x1] * wz0 * wy1 * wx1
    t += values[z1, y0, x0] * wz1 * wy0 * wx0
    t += values[z1, y0, x1] * wz1 * wy0 * wx1
    t += values[z1, y1, x0] * wz1 * wy1 * wx0
    t += values[z1, y1, x1] * wz1 * wy1 * wx1
    return t


@jit
def _sample(data, index, out):
    nz, ny, nx = data.shape[1], data.shape[2], data.shape[3]
    for p in range(index.shape[1]):
        z0, z1, wz0, wz1 = _axis(index[0, p], nz)
        y0, y1, wy0, wy1 = _axis(index[1, p], ny)
        x0, x1, wx0, wx1 = _axis(index[2, p], nx)
        for c in range(data.shape[0]):
            out[c, p] = _corners(data[c], z0, z1, y0, y1, x0, x1,
                                 wz0, wz1, wy0, wy1, wx0, wx1)


def sample(data: np.ndarray, index_zyx: np.ndarray) -> np.ndarray:
    """Values of `data` (c, z, y, x) at continuous indices (3, N) in (z, y, x) order,
    as (c, N) in data's float type; outside the data the nearest border voxel's value."""
    data = np.asarray(data)
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float64)
    index = np.asarray(index_zyx, dtype=np.float64)
    out = np.empty((data.shape[0], index.shape[1]), dtype=data.dtype)
    _sample(data, index, out)
    return out


@jit(inline="always")
def _grid_point(a, b, c, start, to_world, origin):
    """World point (x, y, z) of grid voxel start + (a, b, c), as Grid.index_to_world
    computes it (the matrix row times (i, j, k), then the origin)."""
    i = float(start[2] + c)
    j = float(start[1] + b)
    k = float(start[0] + a)
    px = to_world[0, 0] * i + to_world[0, 1] * j + to_world[0, 2] * k + origin[0]
    py = to_world[1, 0] * i + to_world[1, 1] * j + to_world[1, 2] * k + origin[1]
    pz = to_world[2, 0] * i + to_world[2, 1] * j + to_world[2, 2] * k + origin[2]
    return px, py, pz


@jit(inline="always")
def _moved_point(residual, a, b, c, start, to_world, origin):
    """World point (x, y, z) of grid voxel start + (a, b, c), moved by the residual there
    (components in (z, y, x) order, float32, added in float64)."""
    px, py, pz = _grid_point(a, b, c, start, to_world, origin)
    return px + residual[2, a, b, c], py + residual[1, a, b, c], pz + residual[0, a, b, c]


@jit(inline="always")
def _to_index(qx, qy, qz, to_index, origin):
    """Continuous (z, y, x) index of a world point in a grid given by its inverse
    index-to-world matrix and origin."""
    dx, dy, dz = qx - origin[0], qy - origin[1], qz - origin[2]
    i = to_index[0, 0] * dx + to_index[0, 1] * dy + to_index[0, 2] * dz
    j = to_index[1, 0] * dx + to_index[1, 1] * dy + to_index[1, 2] * dz
    k = to_index[2, 0] * dx + to_index[2, 1] * dy + to_index[2, 2] * dz
    return k, j, i


@jit(inline="always")
def _extend(lo, hi, k, j, i):
    """Widen the box [lo, hi] (z, y, x) to hold the index (k, j, i)."""
    lo[0] = min(lo[0], k)
    lo[1] = min(lo[1], j)
    lo[2] = min(lo[2], i)
    hi[0] = max(hi[0], k)
    hi[1] = max(hi[1], j)
    hi[2] = max(hi[2], i)


@jit
def moved_index_bounds(residual, start, to_world, origin, to_index, index_origin):
    """Smallest and largest continuous (z, y, x) index, in the previous field's grid, of
    the grid voxels moved by the residual: the box of the previous field to read."""
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for a in range(residual.shape[1]):
        for b in range(residual.shape[2]):
            for c in range(residual.shape[3]):
                qx, qy, qz = _moved_point(residual, a, b, c, start, to_world, origin)
                k, j, i = _to_index(qx, qy, qz, to_index, index_origin)
                _extend(lo, hi, k, j, i)
    return lo, hi


@jit
def compose_field(residual, start, to_world, origin, to_index, index_origin, data, box_start,
                  out):
    """out = r + u_prev(x + r) on a chunk of the grid, u_prev sampled trilinearly from
    `data`, the box of the previous field (c, z, y, x) that starts at `box_start`."""
    nz, ny, nx = data.shape[1], data.shape[2], data.shape[3]
    for a in range(residual.shape[1]):
        for b in range(residual.shape[2]):
            for c in range(residual.shape[3]):
                qx, qy, qz = _moved_point(residual, a, b, c, start, to_world, origin)
                k, j, i = _to_index(qx, qy, qz, to_index, index_origin)
                z0, z1, wz0, wz1 = _axis(k - box_start[0], nz)
                y0, y1, wy0, wy1 = _axis(j - box_start[1], ny)
                x0, x1, wx0, wx1 = _axis(i - box_start[2], nx)
                for m in range(3):
                    u = np.float32(_corners(data[m], z0, z1, y0, y1, x0, x1,
                                            wz0, wz1, wy0, wy1, wx0, wx1))
                    out[m, a, b, c] = residual[m, a, b, c] + u


@jit
def compose_affine(residual, start, to_world, origin, matrix, translation, out):
    """out = r + u_prev(x + r) on a chunk of the grid for an affine previous transform
    (moving = matrix @ x + translation, world (x, y, z)), in float64, stored as float32."""
    for a in range(residual.shape[1]):
        for b in range(residual.shape[2]):
            for c in range(residual.shape[3]):
                qx, qy, qz = _moved_point(residual, a, b, c, start, to_world, origin)
                q = (qx, qy, qz)
                for m in range(3):
                    row = 2 - m  # component m (z, y, x) is world axis 2 - m (x, y, z)
                    moved = (matrix[row, 0] * qx + matrix[row, 1] * qy + matrix[row, 2] * qz
                             + translation[row])
                    out[m, a, b, c] = np.float32(float(residual[m, a, b, c])
                                                 + (moved - q[row]))


@jit
def region_index_bounds(start, shape, to_world, origin, to_index, index_origin):
    """Smallest and largest continuous (z, y, x) index, in another grid, of the voxels of
    a region (its `start` and `shape` in a grid given by `to_world` and `origin`).

    The map is affine and each of its floating-point steps is monotone in each index,
    so the extremes lie at the region's 8 corners and are those of every voxel, bit for
    bit."""
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for a in (0, shape[0] - 1):
        for b in (0, shape[1] - 1):
            for c in (0, shape[2] - 1):
                px, py, pz = _grid_point(a, b, c, start, to_world, origin)
                k, j, i = _to_index(px, py, pz, to_index, index_origin)
                _extend(lo, hi, k, j, i)
    return lo, hi


@jit
def moved_indices(start, to_world, origin, field, field_start, to_field, field_origin,
                  to_input, input_origin, out):
    """For every voxel x of a region of a grid (`start`, grid `to_world` and `origin`),
    the continuous (z, y, x) index of x + u(x) in the input's grid: out (nz, ny, nx, 3).

    u is sampled trilinearly from `field`, the box of the field (c, z, y, x; components
    z, y, x) that starts at `field_start` and holds every point's neighbours, each
    component rounded to float32 and added in float64: the arithmetic of
    Grid.region_points, sample_field and Grid.world_to_index in one pass."""
    nz, ny, nx = field.shape[1], field.shape[2], field.shape[3]
    for a in range(out.shape[0]):
        for b in range(out.shape[1]):
            for c in range(out.shape[2]):
                px, py, pz = _grid_point(a, b, c, start, to_world, origin)
                k, j, i = _to_index(px, py, pz, to_field, field_origin)
                z0, z1, wz0, wz1 = _axis(k - field_start[0], nz)
                y0, y1, wy0, wy1 = _axis(j - field_start[1], ny)
                x0, x1, wx0, wx1 = _axis(i - field_start[2], nx)
                uz = np.float32(_corners(field[0], z0, z1, y0, y1, x0, x1,
                                         wz0, wz1, wy0, wy1, wx0, wx1))
                uy = np.float32(_corners(field[1], z0, z1, y0, y1, x0, x1,
                                         wz0, wz1, wy0, wy1, wx0, wx1))
                ux = np.float32(_corners(field[2], z0, z1, y0, y1, x0, x1,
                                         wz0, wz1, wy0, wy1, wx0, wx1))
                k, j, i = _to_index(px + float(ux), py + float(uy), pz + float(uz),
                                    to_input, input_origin)
                out[a, b, c, 0] = k
                out[a, b, c, 1] = j
                out[a, b, c, 2] = i


@jit
def place_indices(index, last, tolerance, nearest):
    """Place continuous indices (nz, ny, nx, 3) onto a grid whose last voxel is `last`
    (z, y, x), in place: an index within `tolerance` of the voxel centres is clipped onto
    them (and, when `nearest`, moved to its voxel: floor(i + 0.5), halves up); any other
    becomes NaN (outside; placing again keeps it so). Returns how many are inside and the
    smallest and largest placed index along each axis."""
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    inside = 0
    for a in range(index.shape[0]):
        for b in range(index.shape[1]):
            for c in range(index.shape[2]):
                ok = True
                for m in range(3):
                    v = index[a, b, c, m]
                    if not (v >= -tolerance and v <= last[m] + tolerance):
                        ok = False
                if not ok:
                    for m in range(3):
                        index[a, b, c, m] = np.nan
                    continue
                inside += 1
                for m in range(3):
                    v = min(max(index[a, b, c, m], 0.0), float(last[m]))
                    if nearest:
                        v = math.floor(v + 0.5)
                    index[a, b, c, m] = v
                    lo[m] = min(lo[m], v)
                    hi[m] = max(hi[m], v)
    return inside, lo, hi


@jit
def interpolate_placed(data, index, box_start, rounding, low, high, out):
    """Trilinear values of `data` (c, z, y, x), the box of the input that starts at
    `box_start`, at placed indices (nz, ny, nx, 3; NaN outside, left untouched in `out`),
    into out (c, nz, ny, nx). SciPy's map_coordinates(order=1) arithmetic in float64;
    with `rounding` (an integer output) rounded half to even and clipped to
    [low, high] first, as NumPy's rint and clip."""
    nz, ny, nx = data.shape[1], data.shape[2], data.shape[3]
    for a in range(index.shape[0]):
        for b in range(index.shape[1]):
            for c in range(index.shape[2]):
                k = index[a, b, c, 0]
                if math.isnan(k):
                    continue
                z0, z1, wz0, wz1 = _axis(k - box_start[0], nz)
                y0, y1, wy0, wy1 = _axis(index[a, b, c, 1] - box_start[1], ny)
                x0, x1, wx0, wx1 = _axis(index[a, b, c, 2] - box_start[2], nx)
                for m in range(data.shape[0]):
                    v = _corners(data[m], z0, z1, y0, y1, x0, x1,
                                 wz0, wz1, wy0, wy1, wx0, wx1)
                    if rounding:
                        v = min(max(np.rint(v), low), high)
                    out[m, a, b, c] = v


@jit
def copy_placed(data, index, box_start, out):
    """The voxels of `data` (c, z, y, x), the box of the input that starts at
    `box_start` (integers), at placed nearest indices (nz, ny, nx, 3; NaN outside, left
    untouched in `out`), copied exactly into out (c, nz, ny, nx)."""
    for a in range(index.shape[0]):
        for b in range(index.shape[1]):
            for c in range(index.shape[2]):
                k = index[a, b, c, 0]
                if math.isnan(k):
                    continue
                z = int(k) - box_start[0]
                y = int(index[a, b, c, 1]) - box_start[1]
                x = int(index[a, b, c, 2]) - box_start[2]
                for m in range(data.shape[0]):
                    out[m, a, b, c] = data[m, z, y, x]


@jit(inline="always")
def _axis_table(n, start, scale, origin, field_scale, field_origin, field_start, field_n):
    """Per voxel along one axis of an axis-aligned grid: the world coordinate and the
    field's lower and upper voxel and weights there (as _grid_point, _to_index and _axis
    compute them when the matrices are diagonal: the zero terms add nothing)."""
    world = np.empty(n)
    lower = np.empty(n, np.int64)
    upper = np.empty(n, np.int64)
    w0 = np.empty(n)
    w1 = np.empty(n)
    for a in range(n):
        p = scale * float(start + a) + origin
        world[a] = p
        i0, i1, v0, v1 = _axis(field_scale * (p - field_origin) - field_start, field_n)
        lower[a] = i0
        upper[a] = i1
        w0[a] = v0
        w1[a] = v1
    return world, lower, upper, w0, w1


@jit(inline="always")
def _row_sum(rows, x0, x1, wx0, wx1):
    """_corners' sum from a row's weighted z, y corners (4, x), rounded to float32."""
    t = 0.0
    t += rows[0, x0] * wx0
    t += rows[0, x1] * wx1
    t += rows[1, x0] * wx0
    t += rows[1, x1] * wx1
    t += rows[2, x0] * wx0
    t += rows[2, x1] * wx1
    t += rows[3, x0] * wx0
    t += rows[3, x1] * wx1
    return np.float32(t)


@jit
def moved_indices_aligned(start, to_world, origin, field, field_start, to_field,
                          field_origin, to_input, input_origin, out):
    """`moved_indices` where the three matrices are diagonal (axis-aligned grids), with
    the same bits: each voxel's world point and field weights are per-axis tables, and
    along a row of x the field's z and y corners are weighted once per field voxel
    (((value * w_z) * w_y), as _corners does) instead of once per output voxel."""
    pz, z0s, z1s, wz0s, wz1s = _axis_table(out.shape[0], start[0], to_world[2, 2], origin[2],
                                           to_field[2, 2], field_origin[2], field_start[0],
                                           field.shape[1])
    py, y0s, y1s, wy0s, wy1s = _axis_table(out.shape[1], start[1], to_world[1, 1], origin[1],
                                           to_field[1, 1], field_origin[1], field_start[1],
                                           field.shape[2])
    px, x0s, x1s, wx0s, wx1s = _axis_table(out.shape[2], start[2], to_world[0, 0], origin[0],
                                           to_field[0, 0], field_origin[0], field_start[2],
                                           field.shape[3])
    nfx = field.shape[3]
    rows = np.empty((3, 4, nfx))
    for a in range(out.shape[0]):
        z0, z1, wz0, wz1 = z0s[a], z1s[a], wz0s[a], wz1s[a]
        for b in range(out.shape[1]):
            y0, y1, wy0, wy1 = y0s[b], y1s[b], wy0s[b], wy1s[b]
            for m in range(3):
                for x in range(nfx):
                    rows[m, 0, x] = field[m, z0, y0, x] * wz0 * wy0
                    rows[m, 1, x] = field[m, z0, y1, x] * wz0 * wy1
                    rows[m, 2, x] = field[m, z1, y0, x] * wz1 * wy0
                    rows[m, 3, x] = field[m, z1, y1, x] * wz1 * wy1
            for c in range(out.shape[2]):
                x0, x1, wx0, wx1 = x0s[c], x1s[c], wx0s[c], wx1s[c]
                uz = _row_sum(rows[0], x0, x1, wx0, wx1)
                uy = _row_sum(rows[1], x0, x1, wx0, wx1)
                ux = _row_sum(rows[2], x0, x1, wx0, wx1)
                out[a, b, c, 0] = to_input[2, 2] * ((pz[a] + float(uz)) - input_origin[2])
                out[a, b, c, 1] = to_input[1, 1] * ((py[b] + float(uy)) - input_origin[1])
                out[a, b, c, 2] = to_input[0, 0] * ((px[c] + float(ux)) - input_origin[0])


@jit
def inside_box(index, low, high, inside):
    """inside[p] = whether index p (rows (z, y, x)) lies within [low, high] on every
    axis (NaN is not inside); returns how many do."""
    count = 0
    for p in range(index.shape[0]):
        ok = True
        for a in range(3):
            v = index[p, a]
            # Written so that a NaN fails it, as NumPy's comparisons do.
            if not (v >= low[a] and v <= high[a]):
                ok = False
        inside[p] = ok
        count += ok
    return count


@jit
def rows_bounds(index, rows):
    """Smallest and largest (z, y, x) index over the given rows of `index` (N, 3)."""
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for r in rows:
        for a in range(3):
            v = index[r, a]
            lo[a] = min(lo[a], v)
            hi[a] = max(hi[a], v)
    return lo, hi


@jit
def group_by_cell(index, rows, shape, cell, counts):
    """`rows` of `index` (N, 3) ordered by the cell of size `cell` (z, y, x) that they
    fall in, cells in C order and rows ascending within each (a counting sort: the order
    `np.argsort(key, kind="stable")` gives), and the number of rows in each cell, written
    into `counts` (one entry per cell). Indices are clipped to the grid first, so that
    the half voxel before the first centre belongs to the first cell."""
    keys = np.empty(rows.size, np.int64)
    flat = counts.reshape(-1)
    flat[:] = 0
    for q in range(rows.size):
        r = rows[q]
        key = 0
        for a in range(3):
            v = min(max(index[r, a], 0.0), shape[a] - 1.0)
            key = key * (counts.shape[a]) + int(v // cell[a])
        keys[q] = key
        flat[key] += 1
    starts = np.empty(flat.size, np.int64)
    total = 0
    for k in range(flat.size):
        starts[k] = total
        total += flat[k]
    order = np.empty(rows.size, np.int64)
    for q in range(rows.size):
        k = keys[q]
        order[starts[k]] = rows[q]
        starts[k] += 1
    return order


@jit
def move_rows(data, index, lo, points, rows, out):
    """out[r] = points[r] + u(index[r]) for the given rows, u sampled trilinearly (the
    arithmetic of `sample`) from `data` (c, z, y, x), the box of the field that starts
    at voxel `lo`; u is rounded to data's type, then added in float64. `points` and
    `out` are world (x, y, z), so component c (z, y, x) goes to column 2 - c."""
    nz, ny, nx = data.shape[1], data.shape[2], data.shape[3]
    value = np.empty(data.shape[0], data.dtype)
    for r in rows:
        z0, z1, wz0, wz1 = _axis(index[r, 0] - lo[0], nz)
        y0, y1, wy0, wy1 = _axis(index[r, 1] - lo[1], ny)
        x0, x1, wx0, wx1 = _axis(index[r, 2] - lo[2], nx)
        for c in range(data.shape[0]):
            value[c] = _corners(data[c], z0, z1, y0, y1, x0, x1,
                                wz0, wz1, wy0, wy1, wx0, wx1)
        for c in range(data.shape[0]):
            out[r, 2 - c] = points[r, 2 - c] + value[c]
