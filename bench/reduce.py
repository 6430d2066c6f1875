"""Field voxels per second of the reduce step alone, on hand-made block results.

Tiles a cubic image into N blocks, gives every block a random smooth residual (stored as
.npy, as a registered block's would be), writes a smooth previous field (a raw zarr made
with dreg.field.displacement.create_field, so every chunk is composed with a previous field,
not an affine), then reduces every chunk of the stage's field with
dreg.registration.reduce.reduce_chunk (blend, compose, write) on a pool of worker processes
(or threads), one chunk per task, each task given only the block results that reach its
chunk (as the flow does). Before the timing starts the workers are set up as
flows.cluster warms Dask workers (compiled loops loaded, glibc's mmap threshold at
1 MiB). Prints progress, then one JSON line: field voxels per second, seconds, peak
memory.

    .venv/bin/python bench/reduce.py [--blocks 216] [--block 64] [--factor 2] [--chunk 64]
                                     [--workers 2] [--pool processes|threads] [--profile]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As Dask's nanny does for every worker (distributed.nanny.pre-spawn-environ): one BLAS
# and OpenMP thread per process. Set before NumPy loads; spawned children inherit it.
# (With OpenBLAS's own threads on a busy 2-core machine, a (N, 3) @ (3, 3) product in
# Grid.world_to_index ran 60 times slower.)
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def smooth_residual(grid, rng, amplitude: float) -> np.ndarray:
    """A random smooth displacement on a grid, (3, z, y, x) world (z, y, x) components:
    per component one plane wave of a block's wavelength plus a constant."""
    points = grid.region_points(tuple(slice(0, n) for n in grid.shape_zyx))
    extent = max(n * s for n, s in zip(grid.shape_zyx, grid.spacing_xyz, strict=True))
    out = np.empty((3, *grid.shape_zyx), np.float32)
    for c in range(3):
        vector = rng.normal(size=3)
        vector /= np.linalg.norm(vector) * extent * rng.uniform(0.5, 1.5)
        wave = np.sin(2 * np.pi * (points @ vector) + rng.uniform(0, 2 * np.pi))
        out[c] = amplitude * (0.5 * wave + rng.uniform(-0.5, 0.5))
    return out


def make_inputs(work: Path, per_axis: int, block: int, overlap: float, factor: float,
                chunk: int, seed: int):
    """Block results with residual files, a previous field, an empty output field."""
    from dreg import field
    from dreg.grid import Grid
    from dreg.io import ome_zarr
    from dreg.registration import tiling
    from dreg.registration.outcome import OK, BlockResult, save_residual

    rng = np.random.default_rng(seed)
    image = Grid((per_axis * block,) * 3, (1.0, 1.0, 1.0))
    field_grid = image.coarsened(factor)
    tiles = tiling.tile(image.shape_zyx, block, overlap, field_grid.shape_zyx, factor)
    results = []
    for tile in tiles:
        uri = str(work / "residuals" / f"{tile.name}.npy")
        save_residual(uri, smooth_residual(field_grid.subgrid(tile.field_box), rng, 1.0))
        results.append(BlockResult(tile, OK, metric_before=0.5, metric_after=0.6, seconds=1.0,
                                   residual_uri=uri))
    previous = field.create_field(str(work / "previous.ome.zarr"), field_grid, chunks=chunk,
                                  overwrite=True)
    model = np.random.default_rng(seed + 1)
    vectors = model.normal(size=(3, 3)) / (image.shape_zyx[0] * 0.7)
    phases = model.uniform(0, 2 * np.pi, 3)

    def previous_values(region):
        points = field_grid.region_points(region)
        return np.stack([3.0 * np.sin(2 * np.pi * (points @ v) + p)
                         for v, p in zip(vectors, phases, strict=True)]).astype(np.float32)

    ome_zarr.write_level_by_chunks(previous, 0, previous_values, workers=2)
    out = field.create_field(str(work / "field.ome.zarr"), field_grid, chunks=chunk,
                             overwrite=True)
    return image, field_grid, results, previous.uri, out.uri


def _ready() -> int:
    # Each worker as flows.cluster warms a Dask worker, before timing: the core imported,
    # its compiled loops loaded, and glibc told to return blocks of 1 MiB and more.
    from dreg.process import release_freed_memory_promptly
    from dreg.registration.reduce import warm_up

    release_freed_memory_promptly()
    warm_up()

    return os.getpid()


def _reduce_one(args) -> dict:
    from dreg.registration.reduce import reduce_chunk

    started, cpu_started = time.perf_counter(), time.process_time()
    counts = reduce_chunk(*args)
    # process_time counts every thread of the process (zarr decodes and encodes in its
    # own): one task at a time per process, so this is the task's CPU time.
    return {**counts, "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=216,
                        help="number of blocks (rounded to a cube: n per axis)")
    parser.add_argument("--block", type=int, default=64, help="block size, image voxels")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--factor", type=float, default=2.0, help="field grid factor")
    parser.add_argument("--chunk", type=int, default=64, help="field chunk size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pool", choices=("processes", "threads"), default="processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="reduce every chunk this many times; figures of the fastest")
    parser.add_argument("--profile", action="store_true",
                        help="also reduce every chunk once in this process under cProfile "
                             "and print the top functions (stderr)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    from dreg.io import ome_zarr
    from dreg.registration.reduce import blocks_for_chunk

    per_axis = max(1, round(args.blocks ** (1 / 3)))
    owned = args.dir is None
    work = Path(args.dir or tempfile.mkdtemp(prefix="dreg-bench-reduce-"))
    log(f"making {per_axis ** 3} block results ({per_axis}^3 blocks of {args.block}^3, "
        f"overlap {args.overlap}) and a previous field in {work}")
    started = time.perf_counter()
    image, field_grid, results, previous, out = make_inputs(
        work, per_axis, args.block, args.overlap, args.factor, args.chunk, args.seed)
    log(f"inputs ready in {time.perf_counter() - started:.1f} s; field grid "
        f"{field_grid.shape_zyx}, chunks of {args.chunk}^3")

    tasks = []
    for chunk in ome_zarr.chunk_regions(field_grid.shape_zyx, (args.chunk,) * 3):
        tasks.append((blocks_for_chunk(results, chunk), chunk, field_grid, image.shape_zyx,
                      args.factor, previous, [out]))

    if args.pool == "processes":
        # spawn: zarr runs an event-loop thread, which a forked child must not inherit.
        pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        pool = ThreadPoolExecutor(args.workers)
    with pool:
        for future in [pool.submit(_ready) for _ in range(args.workers)]:
            future.result()
        runs = []
        for _ in range(args.repeats):
            log(f"reducing {len(tasks)} chunks on {args.workers} {args.pool}")
            started = time.perf_counter()
            counts = list(pool.map(_reduce_one, tasks))
            runs.append((time.perf_counter() - started, counts))
        seconds, counts = min(runs, key=lambda run: run[0])
    voxels = sum(c["voxels"] for c in counts)
    rate = voxels / seconds
    log(f"{voxels} field voxels in {seconds:.2f} s: {rate / 1e6:.2f} million per second")
    # Full chunks against the partial ones at the far faces (a field grid of n/f + 1
    # voxels leaves slabs one voxel thick when n/f is a multiple of the chunk).
    full = [c for c in counts if c["voxels"] == args.chunk**3]
    partial = [c for c in counts if c["voxels"] != args.chunk**3]
    task_seconds = sum(c["seconds"] for c in counts)
    full_rate = (sum(c["voxels"] for c in full) / sum(c["seconds"] for c in full)
                 if full else None)
    log(f"{len(full)} full chunks at {(full_rate or 0) / 1e6:.2f} million voxels per second "
        f"per process; {len(partial)} partial chunks take "
        f"{sum(c['seconds'] for c in partial) / task_seconds:.0%} of the task time")

    if args.profile:
        import cProfile
        import pstats

        from dreg.registration.reduce import warm_up

        warm_up()  # as the workers were: the one-time load of the compiled loops apart
        profiler = cProfile.Profile()
        profiler.enable()
        for task in tasks:
            _reduce_one(task)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(15)

    figures = {
        "blocks": len(results),
        "block": args.block,
        "overlap": args.overlap,
        "factor": args.factor,
        "chunk": args.chunk,
        "chunks": len(tasks),
        "pool": args.pool,
        "workers": args.workers,
        "field_shape_zyx": list(field_grid.shape_zyx),
        "field_voxels": voxels,
        "seconds": round(seconds, 3),
        "field_voxels_per_s": round(rate),
        "full_chunks": len(full),
        "full_chunk_voxels_per_s_per_process": round(full_rate) if full_rate else None,
        "partial_chunks_share_of_task_s": round(
            sum(c["seconds"] for c in partial) / task_seconds, 3),
        "chunk_task_s_mean": round(task_seconds / len(counts), 4),
        # Less sensitive to other load on the machine than the wall-clock rate (processes
        # only: threads share one process's CPU clock).
        "field_voxels_per_cpu_s": round(voxels / sum(c["cpu_seconds"] for c in counts))
        if args.pool == "processes" else None,
        "runs_s": [round(run[0], 3) for run in runs],
        "runs_cpu_s": [round(sum(c["cpu_seconds"] for c in run[1]), 3) for run in runs],
        "load_average": round(os.getloadavg()[0], 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "worker_peak_rss_mb": round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1)
        if args.pool == "processes" else None,
    }
    if owned:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
