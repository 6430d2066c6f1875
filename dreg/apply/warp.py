"""Warp: resample an image of the moving space onto the fixed grid through a field.

The registration's field u maps fixed points to moving points, so the warped image at a
fixed-grid voxel x is the input image sampled at y = x + u(x) (DESIGN.md, "Using the
result"). The input may be the moving image, another channel, a label map, or an image on
any other grid of the moving space (a coarser level, another acquisition): y is placed in
the input's own grid. Work goes one output chunk at a time: a chunk reads the field around
it and only the box of the input its points map into, never a whole level.

Points that map outside the input get 0. "linear" is trilinear interpolation (integer
dtypes rounded and clipped); "nearest" keeps the input's values exactly, for label maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from dreg.errors import InputError
from dreg.field import open_field, sample_field, trilinear
from dreg.grid import Grid, Region, region_from_bounds, region_shape
from dreg.io import completion, mapped, ome_zarr, pyramid
from dreg.io.chunk_cache import ChunkCache

LINEAR = "linear"
NEAREST = "nearest"
INTERPOLATIONS = (LINEAR, NEAREST)
DEFAULT_MAX_SOURCE_VOXELS = 64**3 * 8
# How far (in input voxels) a point may lie beyond the first or last voxel centre and
# still count as inside: world -> index round trips and float32 displacements put points
# that are exactly on the border a hair outside it.
OUTSIDE_TOLERANCE = 1e-3
OVERLAP_SAMPLES = 9  # lattice points per axis of the fixed grid for check_image_meets_field


def interpolation_order(interpolation: str) -> int:
    """The spline order of an interpolation name (1 linear, 0 nearest)."""
    if interpolation not in INTERPOLATIONS:
        raise InputError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {interpolation!r}"
        )
    return 1 if interpolation == LINEAR else 0


def pyramid_method(interpolation: str) -> str:
    """The pyramid method that suits an interpolation: a nearest-neighbour warp is a label
    map, whose coarser levels must not be smoothed."""
    interpolation_order(interpolation)
    return pyramid.NEAREST if interpolation == NEAREST else pyramid.GAUSSIAN


def fixed_grid_of(field: ome_zarr.OmeZarrImage) -> Grid:
    """The fixed image's full-resolution grid, as the field records it."""
    try:
        return Grid.from_dict(field.attributes["fixed"])
    except (KeyError, TypeError, ValueError):
        raise InputError(
            f"{field.uri}: the field does not record the fixed image's grid (dreg.fixed)"
        ) from None


def warped_grids(fixed_grid: Grid) -> list[Grid]:
    """The warped image's pyramid grids: the fixed grid, then halved down to 64."""
    return pyramid.pyramid_grids(fixed_grid)


def create_warped(
    uri: str,
    fixed_grid: Grid,
    dtype: str | np.dtype,
    components: int | None,
    chunks: int = ome_zarr.DEFAULT_CHUNK,
    overwrite: bool = False,
    attributes: dict | None = None,
) -> ome_zarr.OmeZarrImage:
    """An empty OME-Zarr 0.5 pyramid on the fixed grid, ready to be written chunk by chunk.

    It keeps the input's dtype and c axis (`components`, None for a scalar image).
    `attributes` go into the root's ``dreg`` object after ``kind: warped_image``
    (e.g. source image, field, interpolation).
    """
    return ome_zarr.create_image(
        uri,
        warped_grids(fixed_grid),
        dtype,
        chunks=chunks,
        components=components,
        dreg_attributes={"kind": "warped_image", **(attributes or {})},
        name="warped",
        overwrite=overwrite,
    )


Reader = Callable[[Region], np.ndarray]


def source_indices(
    field: ome_zarr.OmeZarrImage, input_grid: Grid, out_grid: Grid, region: Region,
    read_field: Reader | None = None,
) -> np.ndarray:
    """Continuous (z, y, x) indices in `input_grid` of y = x + u(x) for every voxel x of
    `region` of `out_grid`, shape (nz, ny, nx, 3).

    One compiled pass (trilinear.moved_indices) over the region, reading only the box of
    the field around it: the arithmetic of ``input_grid.world_to_index(points +
    sample_field(field, points))`` with ``points = out_grid.region_points(region)``, bit
    for bit where the grids' directions are axis-aligned (NumPy's matrix products may
    differ from it in the last bit for oblique ones). `read_field` returns a box of the
    field (default: `mapped.read_region`)."""
    start = np.array([s.start for s in region], dtype=np.int64)
    shape = np.array(region_shape(region), dtype=np.int64)
    to_world = out_grid.index_to_world_matrix
    origin = np.asarray(out_grid.origin_xyz, dtype=float)
    field_grid = field.levels[0].grid
    to_field = np.linalg.inv(field_grid.index_to_world_matrix)
    field_origin = np.asarray(field_grid.origin_xyz, dtype=float)
    low, high = trilinear.region_index_bounds(start, shape, to_world, origin, to_field,
                                              field_origin)
    # The box sample_field reads: from the floor of the smallest index to the ceiling of
    # the largest, within the field (outside it, its border voxels are held).
    field_shape = np.array(field_grid.shape_zyx)
    lo = np.clip(np.floor(low).astype(int), 0, field_shape - 1)
    hi = np.clip(np.ceil(high).astype(int) + 1, lo + 1, field_shape)
    box = region_from_bounds(lo, hi)
    data = mapped.read_region(field, 0, box) if read_field is None else read_field(box)
    out = np.empty((*region_shape(region), 3), dtype=np.float64)
    to_input = np.linalg.inv(input_grid.index_to_world_matrix)
    # Axis-aligned grids (the usual case) take the per-axis kernel: the same bits, about
    # half the arithmetic.
    aligned = all(_diagonal(m) for m in (to_world, to_field, to_input))
    kernel = trilinear.moved_indices_aligned if aligned else trilinear.moved_indices
    kernel(start, to_world, origin, np.ascontiguousarray(data, dtype=np.float32),
           lo.astype(float), to_field, field_origin, to_input,
           np.asarray(input_grid.origin_xyz, dtype=float), out)
    return out


def _diagonal(matrix: np.ndarray) -> bool:
    return not np.any(matrix[~np.eye(3, dtype=bool)])


def warp_region(
    field: ome_zarr.OmeZarrImage,
    image: ome_zarr.OmeZarrImage,
    level: int,
    out_grid: Grid,
    region: Region,
    interpolation: str,
    max_source_voxels: int = DEFAULT_MAX_SOURCE_VOXELS,
) -> np.ndarray:
    """The warped voxels of `region` of `out_grid`, in the input image's dtype.

    Samples level `level` of `image` at x + u(x): shape region_shape(region), or
    (c, ...) for a vector image; 0 where the point falls outside the input. Reads only
    the box of the input the points need; where that box would hold more than
    `max_source_voxels` voxels, the region is split in two and each half done alone.
    """
    values, _ = warp_region_counted(
        field, image, level, out_grid, region, interpolation, max_source_voxels
    )
    return values


def warp_region_counted(
    field: ome_zarr.OmeZarrImage,
    image: ome_zarr.OmeZarrImage,
    level: int,
    out_grid: Grid,
    region: Region,
    interpolation: str,
    max_source_voxels: int = DEFAULT_MAX_SOURCE_VOXELS,
    read: Reader | None = None,
    read_field: Reader | None = None,
) -> tuple[np.ndarray, int]:
    """`warp_region` and the number of input voxels it read (the boxes' voxels).

    `read` returns a box of the input level (default: `ome_zarr.read_region`), and
    `read_field` one of the field (default: `mapped.read_region`); a batch of chunks
    passes `ChunkCache`s', which decode (and check) each chunk once for the batch."""
    order = interpolation_order(interpolation)
    index = source_indices(field, image.level(level).grid, out_grid, region, read_field)
    if read is None:
        def read(box: Region) -> np.ndarray:
            return ome_zarr.read_region(image, level, box)
    return _resample(image, level, index, order, max_source_voxels, read)


def _resample(
    image: ome_zarr.OmeZarrImage, level: int, index: np.ndarray, order: int,
    max_source_voxels: int, read: Reader,
) -> tuple[np.ndarray, int]:
    """The input sampled at continuous indices (nz, ny, nx, 3), and the voxels read.

    The indices are placed in place (trilinear.place_indices): clipped onto the grid
    within OUTSIDE_TOLERANCE of it, rounded to voxels (floor(i + 0.5), halves up) for
    nearest, NaN outside; placing them again (a half, below) changes nothing."""
    lv = image.level(level)
    out_shape = index.shape[:-1]
    last = np.asarray(lv.grid.shape_zyx, dtype=np.int64) - 1
    inside, low, high = trilinear.place_indices(index, last, OUTSIDE_TOLERANCE, order == 0)
    if inside == 0:
        return _zeros(image, lv.dtype, out_shape), 0
    # The box interpolating at the placed indices reads.
    box = region_from_bounds(np.floor(low).astype(int), np.ceil(high).astype(int) + 1)
    voxels = math.prod(region_shape(box))
    if voxels > max_source_voxels and math.prod(out_shape) > 1:
        return _resample_halves(image, level, index, order, max_source_voxels, read)
    data = read(box)
    out = _zeros(image, lv.dtype, out_shape)
    lead = image.components is None  # the kernels take (c, z, y, x)
    data, values = (data[None], out[None]) if lead else (data, out)
    box_start = np.array([s.start for s in box], dtype=np.int64)
    if order == 0:
        # Copied, never through float64, which would alter 64-bit labels beyond 2**53.
        trilinear.copy_placed(data, index, box_start, values)
    else:
        _interpolate(data, index, box_start, values)
    return out, voxels


def _interpolate(data: np.ndarray, index: np.ndarray, box_start: np.ndarray,
                 out: np.ndarray) -> None:
    """Trilinear values at placed indices into `out` (c, ...), in its dtype: SciPy's
    map_coordinates(order=1) arithmetic in float64, then as NumPy would store it (integer
    dtypes rounded half to even and clipped to the dtype's range)."""
    start = box_start.astype(float)
    if not np.issubdtype(out.dtype, np.integer):
        trilinear.interpolate_placed(data, index, start, False, 0.0, 0.0, out)
        return
    info = np.iinfo(out.dtype)
    if info.bits < 64:
        trilinear.interpolate_placed(data, index, start, True, float(info.min),
                                     float(info.max), out)
        return
    # 64-bit integers: float64 cannot hold their bounds, and the compiled cast of an
    # out-of-range float is not NumPy's; NumPy converts.
    values = np.full(out.shape, np.nan)
    trilinear.interpolate_placed(data, index, start, False, 0.0, 0.0, values)
    inside = ~np.isnan(values)
    out[inside] = np.clip(np.rint(values[inside]), info.min, info.max).astype(out.dtype)


def _resample_halves(
    image: ome_zarr.OmeZarrImage, level: int, index: np.ndarray, order: int,
    max_source_voxels: int, read: Reader,
) -> tuple[np.ndarray, int]:
    """Split the output along its longest axis and resample each half alone, so that
    each half reads a smaller input box."""
    axis = int(np.argmax(index.shape[:-1]))
    first, second = np.array_split(index, 2, axis=axis)
    a, read_a = _resample(image, level, first, order, max_source_voxels, read)
    b, read_b = _resample(image, level, second, order, max_source_voxels, read)
    spatial_axis = axis + (0 if image.components is None else 1)
    return np.concatenate([a, b], axis=spatial_axis), read_a + read_b


def _zeros(image: ome_zarr.OmeZarrImage, dtype: str, shape_zyx) -> np.ndarray:
    lead = () if image.components is None else (image.components,)
    return np.zeros((*lead, *shape_zyx), dtype=np.dtype(dtype))


def warp_chunk(
    field_uri: str,
    image_uri: str,
    level: int,
    out_uri: str,
    region: Region,
    interpolation: str,
) -> dict:
    """Warp one region (whole chunks) of the output's level 0 and write it.

    Returns {"voxels": voxels written, "source_voxels_read": input voxels read}.
    """
    field = open_field(field_uri)
    image = ome_zarr.open_image(image_uri)
    out = ome_zarr.open_image(out_uri)
    values, read = warp_region_counted(
        field, image, level, out.levels[0].grid, region, interpolation
    )
    ome_zarr.write_region(out, 0, region, values)
    return {"voxels": math.prod(region_shape(region)), "source_voxels_read": int(read)}


def warp_batch(
    field_uri: str,
    image_uri: str,
    level: int,
    out_uri: str,
    chunks: Sequence[tuple[str, Region]],
    interpolation: str,
    token: str,
) -> list[dict]:
    """Warp a batch of the output's level-0 chunks (named regions, whole chunks), each
    written under its own chunk mark (`completion.once` with the output's `token`), so
    that a retried or resumed batch skips the chunks it had written.

    The field, input and output (and their arrays) are opened once, and the input's and
    field's chunks are decoded once for the batch while neighbouring output chunks need
    them (`ChunkCache`).
    Returns each chunk's {"voxels", "source_voxels_read"}, in order."""
    field = open_field(field_uri)
    image = ome_zarr.open_image(image_uri)
    out = ome_zarr.open_image(out_uri)
    cache, field_cache = ChunkCache(image, level), ChunkCache(field, 0)
    array = ome_zarr.open_level(out, 0, mode="r+")

    def write(region: Region) -> dict:
        values, read = warp_region_counted(field, image, level, out.levels[0].grid, region,
                                           interpolation, read=cache.read_region,
                                           read_field=field_cache.read_region)
        ome_zarr.write_region(out, 0, region, values, array)
        return {"voxels": math.prod(region_shape(region)), "source_voxels_read": int(read)}

    return [completion.once(out_uri, token, name, lambda r=region: write(r))
            for name, region in chunks]


def mapped_bounds(
    field: ome_zarr.OmeZarrImage, samples: int = OVERLAP_SAMPLES
) -> tuple[np.ndarray, np.ndarray]:
    """World (x, y, z) bounding box (min, max) of x + u(x) over a lattice of `samples`
    points per axis of the fixed grid: where the field sends the fixed image."""
    grid = fixed_grid_of(field)
    axes = [np.linspace(0, n - 1, min(samples, n)) for n in grid.shape_zyx]
    index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    points = grid.index_to_world(index)
    moved = points + sample_scattered(field, points)
    return moved.min(axis=0), moved.max(axis=0)


def sample_scattered(field: ome_zarr.OmeZarrImage, points_xyz: np.ndarray) -> np.ndarray:
    """u at scattered world points (N, 3), one field chunk's points at a time.

    Sampling them all at once would read the box they span, the whole field for a
    lattice over the fixed image; by chunk, each read is a few chunks at most.
    """
    lv = field.levels[0]
    index = lv.grid.world_to_index(points_xyz)
    index = np.clip(index, 0, np.asarray(lv.grid.shape_zyx) - 1)
    chunk = np.floor(index / np.asarray(lv.chunks_zyx)).astype(int)
    _, group = np.unique(chunk, axis=0, return_inverse=True)
    group = group.reshape(-1)
    out = np.empty(points_xyz.shape, dtype=np.float64)
    for g in range(group.max() + 1):
        members = group == g
        out[members] = sample_field(field, points_xyz[members])
    return out


def check_image_meets_field(image: ome_zarr.OmeZarrImage, field: ome_zarr.OmeZarrImage) -> None:
    """Raise InputError when the image's physical extent does not meet the region the
    field maps the fixed image into: its warp would be all zeros."""
    image_lo, image_hi = image.levels[0].grid.world_bounds()
    mapped_lo, mapped_hi = mapped_bounds(field)
    # A hair of slack, as for points on the border: the lattice and float32 field are
    # not exact, and an image that touches the region at one plane still meets it.
    slack = OUTSIDE_TOLERANCE * max(image.levels[0].grid.spacing_xyz)
    if np.any(mapped_hi < image_lo - slack) or np.any(mapped_lo > image_hi + slack):
        raise InputError(
            f"{image.uri}: its physical extent {_box_text(image_lo, image_hi)} does not "
            f"meet the region the field maps the fixed image into "
            f"{_box_text(mapped_lo, mapped_hi)} (world x, y, z)"
        )


def _box_text(lo: np.ndarray, hi: np.ndarray) -> str:
    return "[" + ", ".join(f"{a:.4g}..{b:.4g}" for a, b in zip(lo, hi, strict=True)) + "]"
