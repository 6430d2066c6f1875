"""The fixed-point inversion of a displacement field on a box of a grid, compiled with
Numba: every voxel iterates on its own, to convergence, in one loop.

`dreg.apply.invert` documents the method (damped fixed-point iteration of x + u(x) = y,
NaN where there is no preimage); this is its per-voxel loop, with the arithmetic of its
NumPy form (`invert.invert_points`) step for step: u(y) sampled from the float32 field
and rounded to float32, the iterates' u sampled from the same values in float64, the
residual measured in field voxels, the same acceptance, damping and stopping rules per
voxel. The trilinear sums are `trilinear`'s, which are SciPy's. So where the grids'
directions are axis-aligned (their matrix products exact) the inverse is the NumPy
form's bit for bit; for oblique ones NumPy's matrix products may round differently in
the last bit, and the two differ by about the float rounding of the iteration.

The field is read as one box held in memory; a sample that needs a voxel outside it is
counted (`escaped`) and the bounds it needs recorded, so that the caller can read a
larger box and run again (each voxel's result does not depend on the box, only on the
field's values, so running again gives the same bits).
"""

from __future__ import annotations

import math

import numpy as np

from dreg.compiled import jit
from dreg.field.trilinear import _axis, _corners, _grid_point, _to_index


@jit(inline="always")
def _widen(index, n, need, axis):
    """Widen `need` to the voxels a sample at `index` weighs along one axis (clipped to
    the n voxels of the field). A NaN index needs nothing (a NaN field makes the point
    fail anyway)."""
    if index == index:
        first = min(max(math.floor(index), 0), n - 1)
        need[axis] = min(need[axis], first)
        need[3 + axis] = max(need[3 + axis], min(max(math.ceil(index) + 1, first + 1), n))


@jit(inline="always")
def _sample(data, box, held, field_shape, to_index, field_origin, px, py, pz, need):
    """u at a world point as world (x, y, z) components from the box `data` (c, z, y, x)
    that starts at box[0:3] (field indices), float64; and whether the box held every
    voxel the sample needs: its indices within held[0:3] and held[3:6] (the box's first
    and last voxel, or infinite where the box reaches the field's border, beyond which
    the border's value is held). If not, `need` is widened to what it needs."""
    k, j, i = _to_index(px, py, pz, to_index, field_origin)
    inside = not (k < held[0] or k > held[3] or j < held[1] or j > held[4]
                  or i < held[2] or i > held[5])  # NaN compares false: needs nothing
    if not inside:
        _widen(k, field_shape[0], need, 0)
        _widen(j, field_shape[1], need, 1)
        _widen(i, field_shape[2], need, 2)
    z0, z1, wz0, wz1 = _axis(k - box[0], data.shape[1])
    y0, y1, wy0, wy1 = _axis(j - box[1], data.shape[2])
    x0, x1, wx0, wx1 = _axis(i - box[2], data.shape[3])
    uz = _corners(data[0], z0, z1, y0, y1, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1)
    uy = _corners(data[1], z0, z1, y0, y1, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1)
    ux = _corners(data[2], z0, z1, y0, y1, x0, x1, wz0, wz1, wy0, wy1, wx0, wx1)
    return ux, uy, uz, inside


@jit(inline="always")
def _voxel_length(rx, ry, rz, to_index):
    """Length of a world vector in field voxels (its index step's norm, i then j then k,
    as NumPy sums a row of three)."""
    si = to_index[0, 0] * rx + to_index[0, 1] * ry + to_index[0, 2] * rz
    sj = to_index[1, 0] * rx + to_index[1, 1] * ry + to_index[1, 2] * rz
    sk = to_index[2, 0] * rx + to_index[2, 1] * ry + to_index[2, 2] * rz
    return math.sqrt(si * si + sj * sj + sk * sk)


@jit
def invert_box(start, shape, to_world, origin, data, box, field_shape, to_index,
               field_origin, iterations, target, tolerance, min_step, v_out, errors):
    """The inverse on the grid voxels start + [0, shape) (z, y, x) of the grid given by
    `to_world` (index step to world step) and `origin`.

    `data` is the field's box (c, z, y, x), float64, from field index box[0:3] to
    box[3:6]; `to_index` and `field_origin` map world points into the field's indices.
    Writes v (3, z, y, x) as float32 world (z, y, x) components into `v_out`, NaN where
    there is no preimage, and the round-trip error |x + u(x) - y| at x = y + v (v as
    stored, u rounded to float32 as `sample_field` gives it; NaN likewise) into `errors`
    (z, y, x). Returns how many samples needed voxels outside the box, and the bounds
    (z, y, x starts, then stops) of the voxels those samples needed."""
    need = np.empty(6, dtype=np.int64)
    need[:3] = field_shape.max()
    need[3:] = -1
    # A sample at field index k weighs voxels floor(k) and floor(k) + 1 (clipped to the
    # field): all in the box when box start <= k <= box stop - 1, on each axis.
    held = np.empty(6)
    for axis in range(3):
        held[axis] = -np.inf if box[axis] == 0 else float(box[axis])
        held[3 + axis] = (np.inf if box[3 + axis] == field_shape[axis]
                          else float(box[3 + axis] - 1))
    escaped = 0
    nz, ny, nx = field_shape[0], field_shape[1], field_shape[2]
    for a in range(shape[0]):
        for b in range(shape[1]):
            for c in range(shape[2]):
                yx, yy, yz = _grid_point(a, b, c, start, to_world, origin)
                # u(y) as sample_field gives it: float32.
                ux, uy, uz, ok = _sample(data, box, held, field_shape, to_index, field_origin,
                                         yx, yy, yz, need)
                escaped += 0 if ok else 1
                xx = yx - float(np.float32(ux))
                xy = yy - float(np.float32(uy))
                xz = yz - float(np.float32(uz))
                ux, uy, uz, ok = _sample(data, box, held, field_shape, to_index, field_origin,
                                         xx, xy, xz, need)
                escaped += 0 if ok else 1
                rx, ry, rz = (xx + ux) - yx, (xy + uy) - yy, (xz + uz) - yz
                length = _voxel_length(rx, ry, rz, to_index)
                step = 1.0
                active = not (length <= target)  # NaN stays active, then fails
                done = 0
                while active and done < iterations:
                    done += 1
                    cx, cy, cz = xx - step * rx, xy - step * ry, xz - step * rz
                    ux, uy, uz, ok = _sample(data, box, held, field_shape, to_index, field_origin,
                                             cx, cy, cz, need)
                    escaped += 0 if ok else 1
                    qx, qy, qz = (cx + ux) - yx, (cy + uy) - yy, (cz + uz) - yz
                    candidate = _voxel_length(qx, qy, qz, to_index)
                    if candidate < length:
                        xx, xy, xz = cx, cy, cz
                        rx, ry, rz = qx, qy, qz
                        length = candidate
                        step = min(1.0, 2 * step)
                        if length <= target:
                            active = False
                    else:
                        step *= 0.5
                        if step < min_step:
                            active = False
                # Within half a voxel of the field's grid: the fixed domain it covers.
                k, j, i = _to_index(xx, xy, xz, to_index, field_origin)
                valid = (length <= tolerance and k >= -0.5 and k <= nz - 0.5
                         and j >= -0.5 and j <= ny - 0.5 and i >= -0.5 and i <= nx - 0.5)
                if not valid:
                    v_out[0, a, b, c] = np.nan
                    v_out[1, a, b, c] = np.nan
                    v_out[2, a, b, c] = np.nan
                    errors[a, b, c] = np.nan
                    continue
                vx, vy, vz = np.float32(xx - yx), np.float32(xy - yy), np.float32(xz - yz)
                v_out[0, a, b, c] = vz
                v_out[1, a, b, c] = vy
                v_out[2, a, b, c] = vx
                # The round trip from v as stored, u as sample_field gives it.
                px, py, pz = yx + float(vx), yy + float(vy), yz + float(vz)
                ux, uy, uz, ok = _sample(data, box, held, field_shape, to_index, field_origin,
                                         px, py, pz, need)
                escaped += 0 if ok else 1
                ex = (px + float(np.float32(ux))) - yx
                ey = (py + float(np.float32(uy))) - yy
                ez = (pz + float(np.float32(uz))) - yz
                errors[a, b, c] = math.sqrt(ex * ex + ey * ey + ez * ez)
    return escaped, need
