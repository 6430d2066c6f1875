"""Registration pairs with a known truth for bench/accuracy.py (not a benchmark itself).

Every pair follows `dreg synth`'s convention: a smooth closed-form displacement u
(dreg.synth.make_model) on the fixed grid; fixed(x) = source(x + u(x)); moving = the
source itself; truth.ome.zarr = u, the fixed-to-moving field of DESIGN.md.

- `synth_pair`: `dreg synth`'s texture, on any grid (anisotropic spacing included).
- `brain_pair`: the MNI ICBM152 2009a T1 at 1 mm and its grey- and white-matter maps,
  which ship inside the nilearn wheel (nothing is downloaded). The moving image gets a
  smooth multiplicative intensity bias and Gaussian noise, as a second scan would;
  `modality="t2"` also remaps its intensities to a T2-like contrast (inverted and
  non-linear inside the head, background kept dark), so that the metric has to match
  across modalities. The tissue maps are kept in memory to score a registration by Dice.

A brain is small enough (8.7 M voxels) for this bench to hold it whole; the
registrations themselves read it chunk by chunk as always.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MNI_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
             for name in ("t1", "gm", "wm")}
CHUNK = 64
BIAS_AMPLITUDE = 0.15  # the bias field multiplies intensities by exp(±0.15) at most
NOISE_SHARE = 0.02  # noise sigma as a share of the head's 99th-percentile intensity


@dataclass
class Pair:
    """URIs of fixed, moving and truth, and (brains) the tissue maps for Dice."""

    fixed: str
    moving: str
    truth: str
    grid: object  # dreg.grid.Grid of both images
    tissues_fixed: dict[str, np.ndarray] | None = None
    tissues_moving: dict[str, np.ndarray] | None = None

    def as_dict(self) -> dict:
        return {"fixed": self.fixed, "moving": self.moving, "truth": self.truth}


def mni_folder() -> Path:
    """Where the nilearn wheel keeps the MNI template (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the brain cases need nilearn: "
                         ".venv/bin/pip install -c constraints.txt -e '.[bench]'")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def read_nifti(path: Path):
    """A NIfTI volume as a float32 (z, y, x) array and its dreg Grid (ITK's LPS world)."""
    import itk

    from dreg.grid import Grid

    image = itk.imread(str(path), itk.F)
    array = np.asarray(itk.array_from_image(image), dtype=np.float32)
    direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=float)
    grid = Grid(shape_zyx=array.shape, spacing_xyz=tuple(float(s) for s in image.GetSpacing()),
                origin_xyz=tuple(float(o) for o in image.GetOrigin()),
                direction=tuple(tuple(float(v) for v in row) for row in direction))
    return array, grid


def _write_image(uri: str, array: np.ndarray, grid, name: str, unit: str):
    from dreg.io import ome_zarr, pyramid

    image = ome_zarr.create_image(uri, pyramid.pyramid_grids(grid), "float32", chunks=CHUNK,
                                  name=name, overwrite=True, unit=unit)
    ome_zarr.write_level_by_chunks(image, 0, lambda region: array[region], workers=2)
    pyramid.build_pyramid(image, workers=2)
    return image


def _write_truth(uri: str, model, grid, fixed_image, moving_uri: str) -> None:
    from dreg import field, synth
    from dreg.io import ome_zarr

    truth = field.create_field(uri, grid, fixed=field.fixed_description(fixed_image),
                               moving_uri=moving_uri, chunks=CHUNK, overwrite=True)
    ome_zarr.write_level_by_chunks(truth, 0, lambda r: synth.truth_region(model, grid, r),
                                   workers=2)


def pulled(source: np.ndarray, grid, displacement=None) -> np.ndarray:
    """source(x + u(x)) on every voxel of `grid` (source on the same grid), trilinear, 0
    outside `source`; `displacement` maps world points (..., 3) to u (identity: None)."""
    from scipy.ndimage import map_coordinates

    out = np.empty(grid.shape_zyx, dtype=np.float32)
    for z in range(grid.shape_zyx[0]):  # a slab at a time: the points are float64
        region = (slice(z, z + 1), slice(0, grid.shape_zyx[1]), slice(0, grid.shape_zyx[2]))
        points = grid.region_points(region)
        if displacement is not None:
            points = points + displacement(points)
        out[z] = map_coordinates(source, np.moveaxis(grid.world_to_index(points), -1, 0),
                                 order=1, mode="constant", cval=0.0)[0]
    return out


def synth_pair(out: Path, shape_zyx, spacing_xyz, amplitude_voxels: float,
               seed: int = 1) -> Pair:
    """A `dreg synth` pair on a grid of `shape_zyx` voxels of `spacing_xyz`."""
    from dreg import synth
    from dreg.grid import Grid

    grid = Grid(shape_zyx=tuple(shape_zyx), spacing_xyz=tuple(spacing_xyz))
    written = synth.write_pair(str(out), grid, seed=seed, amplitude_voxels=amplitude_voxels,
                               overwrite=True)
    return Pair(written["fixed"], written["moving"], written["truth"], grid)


def _smooth_field(grid, seed: int) -> np.ndarray:
    """A smooth field of values in [-1, 1] over `grid` (a few long waves)."""
    rng = np.random.default_rng(seed)
    lo, hi = grid.world_bounds()
    extent = float(np.max(hi - lo))
    vectors = rng.normal(size=(3, 3))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) * rng.uniform(0.8, 1.6, 3)[:, None]
    vectors /= extent
    phases = rng.uniform(0, 2 * np.pi, 3)
    out = np.empty(grid.shape_zyx, dtype=np.float32)
    for z in range(grid.shape_zyx[0]):
        region = (slice(z, z + 1), slice(0, grid.shape_zyx[1]), slice(0, grid.shape_zyx[2]))
        points = grid.region_points(region)[0] - (lo + hi) / 2
        out[z] = np.sin(2 * np.pi * points @ vectors.T + phases).mean(axis=-1)
    return out


def probability(array: np.ndarray) -> np.ndarray:
    """A tissue map scaled to 0-1 by its largest value."""
    return (array / max(float(array.max()), 1e-12)).astype(np.float32)


def t2_like(t1: np.ndarray) -> np.ndarray:
    """A T2-like contrast of a T1: inside the head, bright where the T1 is dark (fluid)
    and dark where it is bright (white matter), through a non-linear map; outside, dark."""
    top = float(np.percentile(t1, 99))
    head = t1 > 0.08 * top
    relative = np.clip(t1 / top, 0.0, 1.2)
    return np.where(head, top * (1.2 - relative) ** 1.6, 0.0).astype(np.float32)


def brain_pair(out: Path, modality: str = "t1", amplitude_mm: float = 3.0,
               seed: int = 3) -> Pair:
    """The MNI brain warped by a known smooth field of about `amplitude_mm` per
    component (fixed), and the brain with bias and noise, T1 or T2-like (moving)."""
    from dreg import synth

    folder = mni_folder()
    t1, grid = read_nifti(folder / MNI_FILES["t1"])
    # The maps are probabilities stored as 0-255: scaled to 0-1, so that 0.5 splits them.
    tissues = {name: probability(read_nifti(folder / MNI_FILES[name])[0])
               for name in ("gm", "wm")}
    model = synth.make_model(grid, seed=seed, amplitude_voxels=amplitude_mm / min(grid.spacing_xyz))

    fixed = pulled(t1, grid, model.displacement)
    moving = t2_like(t1) if modality == "t2" else t1.copy()
    top = float(np.percentile(moving, 99))
    rng = np.random.default_rng(seed + 1)
    moving *= np.exp(BIAS_AMPLITUDE * _smooth_field(grid, seed + 2))
    moving += rng.normal(0.0, NOISE_SHARE * top, moving.shape).astype(np.float32)
    np.clip(moving, 0.0, None, out=moving)

    out.mkdir(parents=True, exist_ok=True)
    uris = {name: str(out / f"{name}.ome.zarr") for name in ("fixed", "moving", "truth")}
    fixed_image = _write_image(uris["fixed"], fixed, grid, "fixed", "millimeter")
    _write_image(uris["moving"], moving, grid, "moving", "millimeter")
    _write_truth(uris["truth"], model, grid, fixed_image, uris["moving"])
    tissues_fixed = {name: pulled(array, grid, model.displacement)
                     for name, array in tissues.items()}
    return Pair(uris["fixed"], uris["moving"], uris["truth"], grid,
                tissues_fixed=tissues_fixed, tissues_moving=tissues)
