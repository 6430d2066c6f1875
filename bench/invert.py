"""Inverse voxels per second of inverting a finished registration's field.

Makes a `dreg synth` pair of size^3 (64^3 chunks, in a child process) and, without
registering, a finished registration output from it: a field at spacing factor
`--field-factor` (default 2, as a registration writes it: half the voxels per axis over
the same extent) sampled from the pair's exact field (truth.ome.zarr) as
OUT/field.ome.zarr, and OUT/result.json. Then runs flows.invert.invert_field on a
LocalCluster of single-threaded workers (not warmed for elastix, which inverting does
not use; the task modules are imported up front), and prints progress, then one JSON
line:

    invert_voxels_per_s = inverse voxels / wall seconds of the invert_field flow

with the round-trip error |y + v(y) + u(y + v(y)) - y| the flow measures at every
inverse voxel (max, p99 within one histogram bin, RMS; physical units, which are voxels
here: synth's spacing is 1) and the voxels without an inverse (nan).

The yardstick, in the same run after the flow: ITK's InvertDisplacementFieldImageFilter
(through SimpleITK, whose wrapping has it; ITK's own Python wrapping does not) on the
same field held in memory, on `--yardstick-threads` threads, timed around its Execute
alone, with `--yardstick-iterations` iterations and the tolerances below:

    yardstick_voxels_per_s = the field's voxels / ITK's seconds
    ratio = invert_voxels_per_s / yardstick_voxels_per_s

and the yardstick's own round-trip error, measured as the flow measures its own (u
sampled trilinearly at y + v(y), with v as ITK gives it) over the voxels where dreg
found an inverse (ITK gives a value everywhere, also where there is no preimage).

    .venv/bin/python bench/invert.py [--size 256] [--workers 2] [--field-factor 2] [--keep]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    APPLY_TASK_MODULES,
    emit,
    finished_registration,
    in_flow_with_cluster,
    load_average,
    log,
    make_pair,
    peak_rss_mb,
    prefect_api_kind,
    task_run_spans,
    work_folder,
    worker_peak_rss_mb,
)

# ITK's stopping rule: the largest and the mean norm of the last update, in voxels.
YARDSTICK_MAX_ERROR = 1e-4
YARDSTICK_MEAN_ERROR = 1e-5


def rounded(value: float | None) -> float | None:
    """Four significant digits (round-trip errors are small: 1e-6 and below is usual)."""
    return None if value is None else float(f"{value:.4g}")


def yardstick(out: str, inverse_uri: str, iterations: int, threads: int) -> dict:
    """ITK's InvertDisplacementFieldImageFilter on the field in memory: its seconds, its
    voxels and its round-trip error where dreg's inverse is defined."""
    import numpy as np
    import SimpleITK as sitk

    from dreg.field import open_field, sample_field
    from dreg.grid import components_to_vectors, whole_region
    from dreg.io import ome_zarr
    from dreg.registration.records import load_result

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    field = open_field(load_result(out).field)
    grid = field.levels[0].grid
    u = components_to_vectors(ome_zarr.read_region(field, 0, whole_region(grid.shape_zyx)))
    image = sitk.GetImageFromArray(np.ascontiguousarray(u, dtype=np.float64), isVector=True)
    image.SetSpacing([float(v) for v in grid.spacing_xyz])
    image.SetOrigin([float(v) for v in grid.origin_xyz])
    image.SetDirection([float(v) for v in np.asarray(grid.direction, dtype=float).ravel()])
    invert = sitk.InvertDisplacementFieldImageFilter()
    invert.SetMaximumNumberOfIterations(iterations)
    invert.SetMaxErrorToleranceThreshold(YARDSTICK_MAX_ERROR)
    invert.SetMeanErrorToleranceThreshold(YARDSTICK_MEAN_ERROR)
    # ITK zeroes the inverse on the border by default; dreg does not.
    invert.EnforceBoundaryConditionOff()
    invert.SetNumberOfThreads(threads)
    started = time.perf_counter()
    result = invert.Execute(image)
    seconds = time.perf_counter() - started
    v = sitk.GetArrayFromImage(result).astype(np.float64)  # (z, y, x, 3), world x, y, z
    y = grid.region_points(whole_region(grid.shape_zyx))
    x = y + v
    errors = np.linalg.norm(x + sample_field(field, x) - y, axis=-1)
    inverse = open_field(inverse_uri, mapping="moving_to_fixed")
    if inverse.levels[0].grid == grid:  # compare where dreg found a preimage
        ours = ome_zarr.read_region(inverse, 0, whole_region(grid.shape_zyx))
        errors = errors[~np.isnan(ours).any(axis=0)]
    return {"s": seconds, "voxels": int(np.prod(grid.shape_zyx)),
            "iterations": iterations, "threads": threads,
            "round_trip_max": float(errors.max()),
            "round_trip_p99": float(np.percentile(errors, 99)),
            "round_trip_rms": float(np.sqrt(np.mean(errors**2)))}


def batches_of(result) -> int:
    """Task runs that wrote the inverse (one per chunk before batches existed)."""
    return getattr(result, "batches", 0) or result.chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image edge, voxels")
    parser.add_argument("--amplitude", type=float, default=2.0,
                        help="peak synthetic displacement per component, voxels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--field-factor", type=int, default=2,
                        help="the field's spacing factor (a registration's is usually 2)")
    parser.add_argument("--yardstick-iterations", type=int, default=20)
    parser.add_argument("--yardstick-threads", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary work folder (no effect with --dir)")
    args = parser.parse_args()

    with work_folder(args.dir, "dreg-bench-invert-", args.keep) as work:
        load_before = load_average()
        log(f"making a {args.size}^3 pair in {work} (load average {load_before})")
        started = time.perf_counter()
        pair = make_pair(work / "pair", args.size, amplitude=args.amplitude,
                         workers=args.workers)
        out = finished_registration(pair, work / "out", factor=args.field_factor)
        log(f"pair and finished output ready in {time.perf_counter() - started:.1f} s")

        def body(cluster) -> dict:
            from flows.invert import invert_field
            from flows.options import RunOptions

            address = cluster.scheduler_address
            # The compiled loop, loaded once per worker like the modules (when the bench
            # runs the code from before it existed, there is nothing to load).
            from distributed import Client

            from dreg.apply import invert
            if hasattr(invert, "warm_up"):
                with Client(address) as client:
                    client.run(invert.warm_up)
            log(f"inverting on {args.workers} worker(s)")
            started = time.perf_counter()
            result = invert_field(out, options=RunOptions(dask_address=address))
            wall = time.perf_counter() - started
            spans = task_run_spans(result.flow_run_id, {"invert-chunk": batches_of(result)})
            return {"result": result, "wall": wall, "spans": spans,
                    "workers": worker_peak_rss_mb(address)}

        run = in_flow_with_cluster(args.workers, body, name="dreg-bench-invert", warm=False,
                                   modules=APPLY_TASK_MODULES)
        flow_peak = peak_rss_mb()  # before the yardstick holds the whole field here
        log(f"the yardstick: ITK's InvertDisplacementFieldImageFilter, in memory, "
            f"{args.yardstick_threads} thread(s)")
        stick = yardstick(out, run["result"].output, args.yardstick_iterations,
                          args.yardstick_threads)

    result, wall, spans = run["result"], run["wall"], run["spans"]
    batches = batches_of(result)
    rate = result.voxels / wall
    stick_rate = stick["voxels"] / stick["s"]
    log(f"{result.voxels} inverse voxels in {result.chunks} chunks ({batches} "
        f"batches): {wall:.2f} s, {rate / 1e6:.3f} million voxels per second; round trip "
        f"max {result.max}, p99 {result.p99}, {result.nan} without an inverse")
    log(f"yardstick {stick['s']:.2f} s, {stick_rate / 1e6:.3f} million voxels per second, "
        f"round trip max {stick['round_trip_max']:.3g}; ratio {rate / stick_rate:.2f}")
    chunks = spans["invert-chunk"] if spans else None
    emit({
        "size": args.size, "workers": args.workers, "amplitude": args.amplitude,
        "field_factor": args.field_factor,
        "voxels": result.voxels,
        "chunks": result.chunks,
        "batches": batches,
        "invert_s": round(wall, 3),
        "flow_s": result.seconds,
        "invert_voxels_per_s": round(rate),
        "chunks_s": chunks["s"] if chunks else None,
        "chunk_task_s_mean": round(chunks["task_s"] / result.chunks, 4) if chunks else None,
        "round_trip_max": rounded(result.max),
        "round_trip_p99": rounded(result.p99),
        "round_trip_rms": rounded(result.rms),
        "nan": result.nan,
        "yardstick": f"ITK InvertDisplacementFieldImageFilter (SimpleITK), in memory, "
                     f"{stick['threads']} thread(s), {stick['iterations']} iterations at "
                     f"most, max/mean error tolerance {YARDSTICK_MAX_ERROR}/"
                     f"{YARDSTICK_MEAN_ERROR}",
        "yardstick_s": round(stick["s"], 3),
        "yardstick_voxels_per_s": round(stick_rate),
        "yardstick_round_trip_max": rounded(stick["round_trip_max"]),
        "yardstick_round_trip_p99": rounded(stick["round_trip_p99"]),
        "yardstick_round_trip_rms": rounded(stick["round_trip_rms"]),
        "ratio": round(rate / stick_rate, 3),
        "flow_peak_rss_mb": round(flow_peak, 1),
        "worker_peak_rss_mb": run["workers"],
        "prefect_api": prefect_api_kind(),
        "load_average": [load_before, load_average()],
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    })


if __name__ == "__main__":
    main()
