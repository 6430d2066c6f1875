"""det J voxels per second: the QC's Jacobian determinant over a whole field.

Writes a smooth displacement field of SIZE^3 voxels (chunk by chunk, raw float32 chunks
as registration writes them), then tallies det J over every chunk exactly as a QC brick
task does (read the chunk with its one-voxel halo, det(I + ∇u) along world axes, then
the tally: extremes, folds and histogram), on a pool of worker processes. Also times
the determinant alone on one in-memory chunk (no I/O). Prints progress, then one JSON
line: voxels per second (wall, and per CPU second of the workers), seconds, peak memory.

    .venv/bin/python bench/jacobian.py [--size 256] [--chunk 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# One BLAS/OpenMP thread per process, as Dask's nanny sets for every worker.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
from _common import emit, load_average, log, peak_rss_mb  # noqa: E402


def smooth_displacement(points: np.ndarray, extent: float) -> np.ndarray:
    """A smooth field of a few voxels' amplitude, world (x, y, z) vectors at points."""
    waves = np.array([[1.0, 0.3, -0.2], [-0.4, 1.0, 0.5], [0.2, -0.6, 1.0]]) / extent
    return 3.0 * np.sin(2 * np.pi * points @ waves.T + np.array([0.1, 1.3, 2.2]))


def make_field(uri: str, size: int, chunk: int):
    from dreg.field.displacement import create_field
    from dreg.grid import Grid, vectors_to_components
    from dreg.io import ome_zarr

    grid = Grid((size,) * 3, (1.0, 1.0, 1.0))
    image = create_field(uri, grid, chunks=chunk, overwrite=True)
    ome_zarr.write_level_by_chunks(image, 0, lambda region: vectors_to_components(
        smooth_displacement(grid.region_points(region), float(size))).astype(np.float32))
    return image


def tally_chunk(uri: str, region) -> tuple[int, int, float, float]:
    """One chunk as a QC brick task does it; returns voxels, folds, CPU seconds, min."""
    from dreg.io import ome_zarr
    from dreg.qc.jacobian import JacobianTally, region_determinant

    started = time.process_time()
    tally = JacobianTally.of(region_determinant(ome_zarr.open_image(uri), region)[0])
    return tally.voxels, tally.nonpositive, time.process_time() - started, tally.min


def compute_only(chunk: int, repeats: int = 5) -> float:
    """det J voxels per second on an in-memory chunk with its halo (no I/O, no tally)."""
    from dreg.grid import Grid
    from dreg.qc.jacobian import determinant

    u = np.random.default_rng(0).normal(size=(3, chunk + 2, chunk + 2, chunk + 2))
    grid = Grid((chunk + 2,) * 3, (1.0, 1.0, 1.0))
    inner = (slice(1, chunk + 1),) * 3
    determinant(u, grid, inner)
    started = time.perf_counter()
    for _ in range(repeats):
        determinant(u, grid, inner)
    return repeats * chunk**3 / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="field voxels per axis")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    from dreg.io import ome_zarr

    work = Path(args.dir or tempfile.mkdtemp(prefix="dreg-bench-jacobian-"))
    uri = str(work / "field.ome.zarr")
    log(f"writing a {args.size}^3 field in {work}")
    image = make_field(uri, args.size, args.chunk)
    regions = list(ome_zarr.chunk_regions(image.levels[0].grid.shape_zyx, image.levels[0]
                                          .chunks_zyx))
    load_before = load_average()
    log(f"det J over {len(regions)} chunks on {args.workers} processes")
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        done = list(pool.map(tally_chunk, [uri] * len(regions), regions))
    seconds = time.perf_counter() - started
    voxels = sum(d[0] for d in done)
    cpu = sum(d[2] for d in done)
    emit({
        "jacobian_voxels_per_s": round(voxels / seconds),
        "jacobian_voxels_per_cpu_s": round(voxels / cpu),
        "compute_only_voxels_per_s": round(compute_only(args.chunk)),
        "voxels": voxels, "chunks": len(regions), "seconds": round(seconds, 3),
        "folds": sum(d[1] for d in done), "min_det": round(min(d[3] for d in done), 4),
        "workers": args.workers, "peak_rss_mb": round(peak_rss_mb(), 1),
        "load_before": load_before, "load_after": load_average(),
    })


if __name__ == "__main__":
    main()
