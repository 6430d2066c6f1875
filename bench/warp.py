"""Output voxels per second of warping an image through a finished registration's field.

Makes a `dreg synth` pair of size^3 (64^3 chunks, in a child process) and, without
registering, a finished registration output from it: a field at spacing factor
`--factor` (default 2, as a registration writes it: half the voxels per axis over the
same extent) sampled from the pair's exact field (truth.ome.zarr) as
OUT/field.ome.zarr, and OUT/result.json. Then runs flows.warp.warp_image (the moving
image, linear interpolation) on a LocalCluster of single-threaded workers (not warmed
for elastix, which warping does not use; the task modules are imported up front), and
prints progress, then one JSON line:

    warp_voxels_per_s = level-0 output voxels / wall seconds of the warp_image flow

The flow's wall time includes planning, the pyramid of the output and marking it
complete; level0_s and pyramid_s split it from the task runs' start and end times as
the Prefect API records them (null when the API could not tell).

The yardstick, in the same run after the flow: the same warp in memory on one thread
by ITK's WarpImageFilter (the moving image through the same field, which ITK
interpolates linearly onto the fixed grid itself), timed around its Update alone:

    yardstick_voxels_per_s = level-0 output voxels / ITK's seconds
    ratio = warp_voxels_per_s / yardstick_voxels_per_s

and yardstick_max_abs_diff, the largest difference between the two warped images
away from the border (2 voxels), as a check that both did the same warp.

    .venv/bin/python bench/warp.py [--size 256] [--workers 2] [--factor 2] [--keep]
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


def pyramid_batches(uri: str, workers: int) -> int:
    """Batches of every level of an image below level 0 (one downsample task each)."""
    from dreg.io import ome_zarr
    from dreg.io.batches import chunk_batches

    image = ome_zarr.open_image(uri)
    return sum(len(chunk_batches(lv.grid.shape_zyx, lv.chunks_zyx, workers))
               for lv in image.levels[1:])


def yardstick(out: str, warped_uri: str) -> dict:
    """The same warp in memory on one thread by ITK's WarpImageFilter; its rate, and how
    far its result lies from dreg's away from the border."""
    import itk
    import numpy as np

    from dreg.grid import components_to_vectors, whole_region
    from dreg.io import ome_zarr
    from dreg.registration.records import load_result

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    result = load_result(out)

    def whole(image: ome_zarr.OmeZarrImage) -> np.ndarray:
        return ome_zarr.read_region(image, 0, whole_region(image.levels[0].grid.shape_zyx))

    def placed(itk_image, grid) -> None:
        itk_image.SetSpacing([float(v) for v in grid.spacing_xyz])
        itk_image.SetOrigin([float(v) for v in grid.origin_xyz])
        itk_image.SetDirection(np.asarray(grid.direction, dtype=float))

    moving, field = ome_zarr.open_image(result.moving), ome_zarr.open_image(result.field)
    image = itk.image_from_array(np.ascontiguousarray(whole(moving), dtype=np.float32))
    placed(image, moving.levels[0].grid)
    vector_type = itk.Image[itk.Vector[itk.F, 3], 3]
    displacement = itk.image_from_array(
        np.ascontiguousarray(components_to_vectors(whole(field)), dtype=np.float32),
        ttype=vector_type)
    placed(displacement, field.levels[0].grid)
    warped = ome_zarr.open_image(warped_uri)
    reference = itk.image_from_array(np.zeros(warped.levels[0].grid.shape_zyx, np.float32))
    placed(reference, warped.levels[0].grid)
    warp = itk.WarpImageFilter[type(image), type(image), vector_type].New(
        Input=image, DisplacementField=displacement)
    warp.SetOutputParametersFromImage(reference)
    warp.SetNumberOfWorkUnits(1)
    started = time.perf_counter()
    warp.Update()
    seconds = time.perf_counter() - started
    theirs = itk.array_from_image(warp.GetOutput())
    inner = (slice(2, -2),) * 3
    return {"s": seconds, "voxels": int(theirs.size),
            "max_abs_diff": float(np.abs(theirs[inner] - whole(warped)[inner]).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image edge, voxels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interpolation", choices=("linear", "nearest"), default="linear")
    parser.add_argument("--factor", type=int, default=2,
                        help="the field's spacing factor (a registration's is usually 2)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary work folder (no effect with --dir)")
    args = parser.parse_args()

    with work_folder(args.dir, "dreg-bench-warp-", args.keep) as work:
        load_before = load_average()
        log(f"making a {args.size}^3 pair in {work} (load average {load_before})")
        started = time.perf_counter()
        pair = make_pair(work / "pair", args.size, workers=args.workers)
        out = finished_registration(pair, work / "out", factor=args.factor)
        log(f"pair and finished output ready in {time.perf_counter() - started:.1f} s")

        def body(cluster) -> dict:
            from flows.cluster import worker_count
            from flows.options import RunOptions
            from flows.warp import warp_image

            address = cluster.scheduler_address
            log(f"warping on {args.workers} worker(s)")
            started = time.perf_counter()
            result = warp_image(out, interpolation=args.interpolation,
                                options=RunOptions(dask_address=address))
            wall = time.perf_counter() - started
            spans = task_run_spans(result.flow_run_id,
                                   {"warp-chunks": result.batches,
                                    "downsample-": pyramid_batches(result.output,
                                                                   worker_count(address))})
            return {"result": result, "wall": wall, "spans": spans,
                    "workers": worker_peak_rss_mb(address)}

        run = in_flow_with_cluster(args.workers, body, name="dreg-bench-warp", warm=False,
                                   modules=APPLY_TASK_MODULES)
        flow_peak = peak_rss_mb()  # before the yardstick holds whole images here
        log("the yardstick: ITK's WarpImageFilter, in memory, one thread")
        stick = yardstick(out, run["result"].output)

    result, wall, spans = run["result"], run["wall"], run["spans"]
    rate = result.voxels / wall
    stick_rate = stick["voxels"] / stick["s"]
    log(f"{result.voxels} level-0 voxels in {result.chunks} chunks, {result.levels} levels: "
        f"{wall:.2f} s, {rate / 1e6:.2f} million voxels per second")
    if spans:
        log(f"level 0 {spans['warp-chunks']['s']} s ({result.batches} batches), pyramid "
            f"{spans['downsample-']['s']} s ({spans['downsample-']['runs']} batches)")
    log(f"yardstick {stick['s']:.2f} s, {stick_rate / 1e6:.2f} million voxels per second; "
        f"ratio {rate / stick_rate:.2f}")
    emit({
        "size": args.size, "workers": args.workers, "interpolation": args.interpolation,
        "field_factor": args.factor,
        "voxels": result.voxels,
        "chunks": result.chunks,
        "batches": result.batches,
        "levels": result.levels,
        "warp_s": round(wall, 3),
        "flow_s": result.seconds,
        "warp_voxels_per_s": round(rate),
        "level0_s": spans["warp-chunks"]["s"] if spans else None,
        "level0_voxels_per_s": round(result.voxels / spans["warp-chunks"]["s"])
        if spans and spans["warp-chunks"]["s"] > 0 else None,
        "pyramid_s": spans["downsample-"]["s"] if spans else None,
        "pyramid_batches": spans["downsample-"]["runs"] if spans else None,
        "chunk_task_s_mean": round(spans["warp-chunks"]["task_s"] / result.chunks, 4)
        if spans else None,
        "yardstick": "itk.WarpImageFilter, in memory, 1 thread",
        "yardstick_s": round(stick["s"], 3),
        "yardstick_voxels_per_s": round(stick_rate),
        "ratio": round(rate / stick_rate, 3),
        "yardstick_max_abs_diff": round(stick["max_abs_diff"], 6),
        "flow_peak_rss_mb": round(flow_peak, 1),
        "worker_peak_rss_mb": run["workers"],
        "prefect_api": prefect_api_kind(),
        "load_average": [load_before, load_average()],
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    })


if __name__ == "__main__":
    main()
