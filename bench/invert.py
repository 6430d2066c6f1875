"""Inverse voxels per second of inverting a finished registration's field.

Makes a `dreg synth` pair of size^3 (64^3 chunks, in a child process) and, without
registering, a finished registration output from it: the pair's exact field
(truth.ome.zarr: on the fixed grid at spacing factor 1, where a registration's field is
usually at factor 2, so the inverse has 8 times the voxels it would) as
OUT/field.ome.zarr, and OUT/result.json. Then runs flows.invert.invert_field on a
LocalCluster of single-threaded workers (not warmed for elastix, which inverting does
not use; the task modules are imported up front), and prints progress, then one JSON
line:

    invert_voxels_per_s = inverse voxels / wall seconds of the invert_field flow

with the round-trip error |y + v(y) + u(y + v(y)) - y| the flow measures at every
inverse voxel (max, p99 within one histogram bin, RMS; physical units, which are voxels
here: synth's spacing is 1) and the voxels without an inverse (nan).

    .venv/bin/python bench/invert.py [--size 256] [--workers 2] [--keep]
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
    task_run_spans,
    work_folder,
    worker_peak_rss_mb,
)


def rounded(value: float | None) -> float | None:
    """Four significant digits (round-trip errors are small: 1e-6 and below is usual)."""
    return None if value is None else float(f"{value:.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image edge, voxels")
    parser.add_argument("--amplitude", type=float, default=2.0,
                        help="peak synthetic displacement per component, voxels")
    parser.add_argument("--workers", type=int, default=2)
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
        out = finished_registration(pair, work / "out")
        log(f"pair and finished output ready in {time.perf_counter() - started:.1f} s")

        def body(cluster) -> dict:
            from flows.invert import invert_field
            from flows.options import RunOptions

            address = cluster.scheduler_address
            log(f"inverting on {args.workers} worker(s)")
            started = time.perf_counter()
            result = invert_field(out, options=RunOptions(dask_address=address))
            wall = time.perf_counter() - started
            spans = task_run_spans(result.flow_run_id, {"invert-chunk": result.chunks})
            return {"result": result, "wall": wall, "spans": spans,
                    "workers": worker_peak_rss_mb(address)}

        run = in_flow_with_cluster(args.workers, body, name="dreg-bench-invert", warm=False,
                                   modules=APPLY_TASK_MODULES)

    result, wall, spans = run["result"], run["wall"], run["spans"]
    rate = result.voxels / wall
    log(f"{result.voxels} inverse voxels in {result.chunks} chunks: {wall:.2f} s, "
        f"{rate / 1e6:.3f} million voxels per second; round trip max {result.max}, "
        f"p99 {result.p99}, {result.nan} without an inverse")
    chunks = spans["invert-chunk"] if spans else None
    emit({
        "size": args.size, "workers": args.workers, "amplitude": args.amplitude,
        "field_factor": 1,
        "voxels": result.voxels,
        "chunks": result.chunks,
        "invert_s": round(wall, 3),
        "flow_s": result.seconds,
        "invert_voxels_per_s": round(rate),
        "chunks_s": chunks["s"] if chunks else None,
        "chunk_task_s_mean": round(chunks["task_s"] / result.chunks, 4) if chunks else None,
        "round_trip_max": rounded(result.max),
        "round_trip_p99": rounded(result.p99),
        "round_trip_rms": rounded(result.rms),
        "nan": result.nan,
        "flow_peak_rss_mb": round(peak_rss_mb(), 1),
        "worker_peak_rss_mb": run["workers"],
        "load_average": [load_before, load_average()],
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    })


if __name__ == "__main__":
    main()
