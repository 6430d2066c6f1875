"""Synthetic registration pairs with an exact ground truth, generated chunk by chunk.

A smooth texture f and a smooth displacement u are closed-form functions of world
position. moving = f sampled on the moving grid; fixed(x) = f(x + u(x)) on the fixed
grid; truth = u on the fixed grid. So sampling f at x + u(x) reproduces the fixed image
exactly, and the truth is the fixed-to-moving field of DESIGN.md by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dreg import field
from dreg.grid import Grid, Region, region_shape, vectors_to_components, zyx_to_xyz
from dreg.io import ome_zarr, pyramid, storage

TEXTURE_WAVES = 24
COARSE_WAVES = 6
DISPLACEMENT_WAVES = 3


UNIT = "micrometer"  # a synthetic pair is laid out like a light-sheet volume
# The image dtypes a pair can be written in. An integer pair stores the texture as a
# camera's counts would be: (f + TEXTURE_OFFSET) * (max + 1) / TEXTURE_SPAN, rounded and
# clipped. The texture spans about -175 to 360 (seeds 0-3), so nothing is clipped in
# practice (uint16: 102.4 counts per unit of the float texture).
DTYPES = ("float32", "uint16", "uint8")
TEXTURE_OFFSET = 200.0
TEXTURE_SPAN = 640.0

@dataclass(frozen=True)
class SynthModel:
    """The closed-form texture and displacement of one synthetic pair."""

    wave_vectors: np.ndarray  # (TEXTURE_WAVES, 3) world cycles per unit, xyz
    wave_phases: np.ndarray
    wave_amplitudes: np.ndarray
    disp_vectors: np.ndarray  # (3 components, DISPLACEMENT_WAVES, 3)
    disp_phases: np.ndarray  # (3, DISPLACEMENT_WAVES)
    disp_amplitudes: np.ndarray  # (3, DISPLACEMENT_WAVES) physical units
    shift_xyz: np.ndarray  # constant part of u, physical units
    centre_xyz: np.ndarray

    def texture(self, points_xyz: np.ndarray) -> np.ndarray:
        """f at world points (..., 3), float32."""
        # One wave at a time: a (points x waves) array would be 24 times a chunk's size.
        waves = np.zeros(points_xyz.shape[:-1])
        for vector, phase, amplitude in zip(
            self.wave_vectors, self.wave_phases, self.wave_amplitudes, strict=True
        ):
            waves += amplitude * np.sin(2 * np.pi * (points_xyz @ vector) + phase)
        return (100.0 + 60.0 * waves).astype(np.float32)

    def displacement(self, points_xyz: np.ndarray) -> np.ndarray:
        """u at world points, as world (x, y, z) vectors."""
        rel = points_xyz - self.centre_xyz
        out = np.empty(points_xyz.shape, dtype=float)
        for c in range(3):
            phase = 2 * np.pi * (rel @ self.disp_vectors[c].T) + self.disp_phases[c]
            out[..., c] = np.sin(phase) @ self.disp_amplitudes[c] + self.shift_xyz[c]
        return out


def make_model(
    grid: Grid, seed: int = 0, amplitude_voxels: float = 2.0, shift_voxels=(0.0, 0.0, 0.0)
) -> SynthModel:
    """Draw a texture and displacement for a grid, deterministically from `seed`.

    Fine texture wavelengths run from 5 to 16 of the coarsest voxel spacing, coarse ones
    from 0.3 to 0.8 of the image's extent; displacement
    wavelengths are half to the whole of the image's extent, its peak amplitude about
    `amplitude_voxels` finest voxels per component. `shift_voxels` (z, y, x) adds a
    global shift in voxels along the index axes.
    """
    rng = np.random.default_rng(seed)
    unit = min(grid.spacing_xyz)
    coarse = max(grid.spacing_xyz)
    lo, hi = grid.world_bounds()
    extent = float(np.max(hi - lo)) or 1.0

    def directions(n: int) -> np.ndarray:
        v = rng.normal(size=(n, 3))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    # Fine waves for local detail and coarse waves (a third to most of the extent), as a
    # real specimen has, so that coarse levels still carry structure to align; each set
    # carries half of the texture's variance.
    wavelengths = np.concatenate([rng.uniform(5.0, 16.0, TEXTURE_WAVES) * coarse,
                                  rng.uniform(0.3, 0.8, COARSE_WAVES) * extent])
    wave_vectors = directions(TEXTURE_WAVES + COARSE_WAVES) / wavelengths[:, None]
    fine = rng.uniform(0.5, 1.0, TEXTURE_WAVES)
    coarse_amplitudes = rng.uniform(0.5, 1.0, COARSE_WAVES)
    amplitudes = np.concatenate([fine / np.sqrt((fine**2).sum()),
                                 coarse_amplitudes / np.sqrt((coarse_amplitudes**2).sum())])
    disp_vectors = np.stack(
        [directions(DISPLACEMENT_WAVES) / (rng.uniform(0.5, 1.0, DISPLACEMENT_WAVES)[:, None]
                                            * extent) for _ in range(3)]
    )
    disp_amplitudes = rng.uniform(0.5, 1.0, (3, DISPLACEMENT_WAVES))
    disp_amplitudes *= amplitude_voxels * unit / disp_amplitudes.sum(axis=1, keepdims=True)
    shift_index_xyz = zyx_to_xyz(np.asarray(shift_voxels, dtype=float))
    shift_xyz = grid.index_to_world_matrix @ shift_index_xyz
    return SynthModel(
        wave_vectors=wave_vectors,
        wave_phases=rng.uniform(0, 2 * np.pi, TEXTURE_WAVES + COARSE_WAVES),
        wave_amplitudes=amplitudes,
        disp_vectors=disp_vectors,
        disp_phases=rng.uniform(0, 2 * np.pi, (3, DISPLACEMENT_WAVES)),
        disp_amplitudes=disp_amplitudes,
        shift_xyz=shift_xyz,
        centre_xyz=(lo + hi) / 2,
    )


# Points evaluated at once. The closed forms make several float64 temporaries of the
# points' size; evaluating a chunk in slabs of this many points keeps them near 1 MB.
PIECE_POINTS = 1 << 15


def _pieces(region: Region):
    """Split a region into z-slabs of about PIECE_POINTS voxels: (slab, local index) pairs."""
    zs, ys, xs = region
    step = max(1, PIECE_POINTS // ((ys.stop - ys.start) * (xs.stop - xs.start)))
    for start in range(zs.start, zs.stop, step):
        stop = min(start + step, zs.stop)
        local = (slice(start - zs.start, stop - zs.start), slice(None), slice(None))
        yield (slice(start, stop), ys, xs), local


def fixed_region(model: SynthModel, grid: Grid, region: Region) -> np.ndarray:
    """The fixed image f(x + u(x)) on a region, float32 (z, y, x)."""
    out = np.empty(region_shape(region), dtype=np.float32)
    for piece, local in _pieces(region):
        points = grid.region_points(piece)
        out[local] = model.texture(points + model.displacement(points))
    return out


def moving_region(model: SynthModel, grid: Grid, region: Region) -> np.ndarray:
    """The moving image f(x) on a region, float32 (z, y, x)."""
    out = np.empty(region_shape(region), dtype=np.float32)
    for piece, local in _pieces(region):
        out[local] = model.texture(grid.region_points(piece))
    return out


def truth_region(model: SynthModel, grid: Grid, region: Region) -> np.ndarray:
    """u on a region as (3, z, y, x) with components in world (z, y, x) order."""
    out = np.empty((3, *region_shape(region)), dtype=np.float32)
    for piece, local in _pieces(region):
        u = model.displacement(grid.region_points(piece))
        out[(slice(None), *local)] = vectors_to_components(u)
    return out


def in_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 synthetic image in one of DTYPES (integers scaled and rounded)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype == "float32":
        return image
    info = np.iinfo(dtype)
    scaled = np.rint((image.astype(np.float64) + TEXTURE_OFFSET)
                     * ((info.max + 1) / TEXTURE_SPAN))
    return np.clip(scaled, info.min, info.max).astype(dtype)


def write_pair(
    out: str,
    grid: Grid,
    seed: int = 0,
    amplitude_voxels: float = 2.0,
    shift_voxels=(0.0, 0.0, 0.0),
    chunks: int = ome_zarr.DEFAULT_CHUNK,
    workers: int = 2,
    overwrite: bool = False,
    dtype: str = "float32",
) -> dict:
    """Write fixed.ome.zarr, moving.ome.zarr and truth.ome.zarr under `out`, the images
    in `dtype` (one of DTYPES).

    Returns a summary (URIs, grid, model settings).
    """
    in_dtype(np.zeros(0, np.float32), dtype)  # an unknown dtype fails before any write
    out = storage.normalize_uri(out)
    model = make_model(grid, seed, amplitude_voxels, shift_voxels)
    uris = {name: storage.join(out, f"{name}.ome.zarr") for name in ("fixed", "moving", "truth")}
    grids = pyramid.pyramid_grids(grid)
    images = {}
    for name, compute in (("fixed", fixed_region), ("moving", moving_region)):
        image = ome_zarr.create_image(
            uris[name], grids, dtype, chunks=chunks, name=name, overwrite=overwrite,
            unit=UNIT,
        )
        ome_zarr.write_level_by_chunks(
            image, 0, lambda region, c=compute: in_dtype(c(model, grid, region), dtype),
            workers=workers,
        )
        pyramid.build_pyramid(image, workers=workers)
        images[name] = image
    truth = field.create_field(
        uris["truth"],
        grid,
        fixed=field.fixed_description(images["fixed"]),
        moving_uri=uris["moving"],
        chunks=chunks,
        overwrite=overwrite,
    )
    ome_zarr.write_level_by_chunks(
        truth, 0, lambda region: truth_region(model, grid, region), workers=workers
    )
    return {
        **uris,
        "grid": grid.to_dict(),
        "levels": len(grids),
        "seed": seed,
        "amplitude_voxels": amplitude_voxels,
        "shift_voxels": list(shift_voxels),
        "dtype": dtype,
    }
