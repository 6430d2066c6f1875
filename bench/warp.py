"""Output voxels per second of warping an image through a finished registration's field.

Makes a `dreg synth` pair of size^3 (64^3 chunks, in a child process) and, without
registering, a finished registration output from it: the pair's exact field
(truth.ome.zarr: on the fixed grid at spacing factor 1, where a registration's field is
usually at factor 2, so each output chunk reads 8 times the field voxels it would) as
OUT/field.ome.zarr, and OUT/result.json. Then runs flows.warp.warp_image (the moving
image, linear interpolation) on a LocalCluster of single-threaded workers (not warmed
for elastix, which warping does not use; the task modules are imported up front), and
prints progress, then one JSON line:

    warp_voxels_per_s = level-0 output voxels / wall seconds of the warp_image flow

The flow's wall time includes planning, the pyramid of the output and marking it
complete; level0_s and pyramid_s split it from the task runs' start and end times as
the Prefect API records them (null when the API could not tell).

    .venv/bin/python bench/warp.py [--size 256] [--workers 2] [--keep]
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


def pyramid_chunks(uri: str) -> int:
    """Chunks of every level of an image below level 0 (one downsample task each)."""
    from dreg.io import ome_zarr

    image = ome_zarr.open_image(uri)
    return sum(len(list(ome_zarr.chunk_regions(lv.grid.shape_zyx, lv.chunks_zyx)))
               for lv in image.levels[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image edge, voxels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interpolation", choices=("linear", "nearest"), default="linear")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary work folder (no effect with --dir)")
    args = parser.parse_args()

    with work_folder(args.dir, "dreg-bench-warp-", args.keep) as work:
        load_before = load_average()
        log(f"making a {args.size}^3 pair in {work} (load average {load_before})")
        started = time.perf_counter()
        pair = make_pair(work / "pair", args.size, workers=args.workers)
        out = finished_registration(pair, work / "out")
        log(f"pair and finished output ready in {time.perf_counter() - started:.1f} s")

        def body(cluster) -> dict:
            from flows.options import RunOptions
            from flows.warp import warp_image

            address = cluster.scheduler_address
            log(f"warping on {args.workers} worker(s)")
            started = time.perf_counter()
            result = warp_image(out, interpolation=args.interpolation,
                                options=RunOptions(dask_address=address))
            wall = time.perf_counter() - started
            spans = task_run_spans(result.flow_run_id,
                                   {"warp-chunk": result.chunks,
                                    "downsample-": pyramid_chunks(result.output)})
            return {"result": result, "wall": wall, "spans": spans,
                    "workers": worker_peak_rss_mb(address)}

        run = in_flow_with_cluster(args.workers, body, name="dreg-bench-warp", warm=False,
                                   modules=APPLY_TASK_MODULES)

    result, wall, spans = run["result"], run["wall"], run["spans"]
    rate = result.voxels / wall
    log(f"{result.voxels} level-0 voxels in {result.chunks} chunks, {result.levels} levels: "
        f"{wall:.2f} s, {rate / 1e6:.2f} million voxels per second")
    if spans:
        log(f"level 0 {spans['warp-chunk']['s']} s, pyramid {spans['downsample-']['s']} s "
            f"({spans['downsample-']['runs']} chunks)")
    emit({
        "size": args.size, "workers": args.workers, "interpolation": args.interpolation,
        "field_factor": 1,
        "voxels": result.voxels,
        "chunks": result.chunks,
        "levels": result.levels,
        "warp_s": round(wall, 3),
        "flow_s": result.seconds,
        "warp_voxels_per_s": round(rate),
        "level0_s": spans["warp-chunk"]["s"] if spans else None,
        "level0_voxels_per_s": round(result.voxels / spans["warp-chunk"]["s"])
        if spans and spans["warp-chunk"]["s"] > 0 else None,
        "pyramid_s": spans["downsample-"]["s"] if spans else None,
        "pyramid_chunks": spans["downsample-"]["runs"] if spans else None,
        "chunk_task_s_mean": round(spans["warp-chunk"]["task_s"] / result.chunks, 4)
        if spans else None,
        "flow_peak_rss_mb": round(peak_rss_mb(), 1),
        "worker_peak_rss_mb": run["workers"],
        "prefect_api": prefect_api_kind(),
        "load_average": [load_before, load_average()],
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    })


if __name__ == "__main__":
    main()
