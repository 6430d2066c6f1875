"""Accuracy of block-wise registration against whole-image ITK-Elastix, side by side.

Makes a `dreg synth` pair of size^3 (exact ground truth) and registers it twice with the
same elastix parameter map (dreg.registration.elastix.parameter_map of one B-spline preset and the
same overrides):
- block-wise: register_images with one B-spline block stage at level 0, on a
  LocalCluster of single-threaded workers;
- whole image: dreg.registration.elastix.register on the whole level-0 arrays in this process (after
  elastix's first-use cost is paid, untimed), with MaximumNumberOfThreads set to the
  number of workers so that both use the same cores; its transform sampled with
  dreg.registration.elastix.displacement_on_grid on the block-wise field's grid and written
  to a field
  zarr.
Both fields are compared with the truth by dreg.qc.field_error (RMS and 95th
percentile of |u - u_true| in voxels), and timed. Elastix draws a fixed number of
samples per iteration (NumberOfSpatialSamples) whatever the image's size, so the
block-wise run draws blocks times as many: a third run gives the whole image that same
budget (NumberOfSpatialSamples x blocks), keys *_whole_image_matched_samples.

    .venv/bin/python bench/accuracy.py [--size 128] [--block 64] [--iterations 256]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    emit,
    in_flow_with_cluster,
    load_average,
    log,
    make_pair,
    register,
    stage_pipeline,
)


def whole_image(pair: dict, transform: str, overrides: dict, threads: int, grid,
                out: Path) -> dict:
    """Register the whole level-0 images with elastix; write the field on `grid`."""
    from dreg import field
    from dreg.io import ome_zarr
    from dreg.registration import elastix

    elastix.warm_up(threads)  # elastix's first use in this process, untimed
    started = time.perf_counter()
    fixed, moving = ome_zarr.open_image(pair["fixed"]), ome_zarr.open_image(pair["moving"])
    level = fixed.levels[0]
    everything = tuple(slice(0, n) for n in level.grid.shape_zyx)
    fixed_array = ome_zarr.read_region(fixed, 0, everything)
    moving_array = ome_zarr.read_region(moving, 0, everything)
    if moving.levels[0].grid != level.grid:
        raise RuntimeError("the whole-image comparison needs both images on one grid")
    pmap = elastix.parameter_map(transform, overrides, threads)
    registered = time.perf_counter()
    result = elastix.register(fixed_array, moving_array, level.grid, pmap)
    elastix_s = time.perf_counter() - registered
    displacement = elastix.displacement_on_grid(result.transform, grid)
    image = field.create_field(str(out), grid, overwrite=True)
    ome_zarr.write_region(image, 0, tuple(slice(0, n) for n in grid.shape_zyx), displacement)
    return {"seconds": time.perf_counter() - started, "elastix_s": elastix_s, "uri": image.uri}


def elastix_default_samples() -> str:
    """NumberOfSpatialSamples of the B-spline preset's map (what each block draws)."""
    from dreg.registration import elastix

    return elastix.parameter_map("bspline")["NumberOfSpatialSamples"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image edge, voxels")
    parser.add_argument("--block", type=int, default=64, help="block edge, voxels")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--iterations", type=int, default=256,
                        help="elastix MaximumNumberOfIterations")
    parser.add_argument("--grid-spacing", type=int, default=8,
                        help="elastix FinalGridSpacingInVoxels of the B-spline")
    parser.add_argument("--amplitude", type=float, default=2.0,
                        help="peak synthetic displacement per component, voxels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    owned = args.dir is None
    work = Path(args.dir or tempfile.mkdtemp(prefix="dreg-bench-accuracy-"))
    load_before = load_average()
    log(f"making a {args.size}^3 pair in {work} (load average {load_before})")
    pair = make_pair(work / "pair", args.size, amplitude=args.amplitude)
    overrides = {"MaximumNumberOfIterations": args.iterations,
                 "FinalGridSpacingInVoxels": args.grid_spacing}
    pipeline = stage_pipeline("bspline", args.block, args.overlap, overrides)

    log(f"block-wise: blocks of {args.block}, overlap {args.overlap}, {args.workers} workers")
    blockwise = in_flow_with_cluster(
        args.workers,
        lambda cluster: register(pair, work / "blockwise", pipeline, cluster.scheduler_address),
        name="dreg-bench-accuracy")

    from dreg.field.displacement import open_field
    from dreg.qc.accuracy import field_error

    (stage,) = blockwise["result"].stages
    field_uri = blockwise["result"].field
    grid = open_field(field_uri).levels[0].grid
    block_error = field_error(field_uri, pair["truth"])
    log(f"block-wise: RMS {block_error['rms_after']:.4f} voxels "
        f"(before {block_error['rms_before']:.4f}) in {blockwise['wall']:.1f} s")

    log(f"whole image: {args.size}^3 in one elastix run, {args.workers} threads")
    whole = whole_image(pair, "bspline", overrides, args.workers, grid,
                        work / "whole-image.ome.zarr")
    whole_error = field_error(whole["uri"], pair["truth"])
    log(f"whole image: RMS {whole_error['rms_after']:.4f} voxels in {whole['seconds']:.1f} s")

    # Elastix draws a fixed number of samples per iteration whatever the image's size,
    # so the block-wise run draws `blocks` times as many in all: also give the whole
    # image that budget.
    samples = int(elastix_default_samples()) * stage.blocks
    log(f"whole image with the block-wise sample budget ({samples} samples per iteration)")
    matched = whole_image(pair, "bspline", {**overrides, "NumberOfSpatialSamples": samples},
                          args.workers, grid, work / "whole-image-matched.ome.zarr")
    matched_error = field_error(matched["uri"], pair["truth"])
    log(f"whole image, matched samples: RMS {matched_error['rms_after']:.4f} voxels in "
        f"{matched['seconds']:.1f} s")

    emit({
        "size": args.size, "block": args.block, "overlap": args.overlap,
        "iterations": args.iterations, "grid_spacing_voxels": args.grid_spacing,
        "amplitude_voxels": args.amplitude, "workers": args.workers,
        "blocks": stage.blocks, "counts": stage.counts,
        "rms_before": round(block_error["rms_before"], 4),
        "rms_blockwise": round(block_error["rms_after"], 4),
        "rms_whole_image": round(whole_error["rms_after"], 4),
        "p95_blockwise": round(block_error["p95_after"], 4),
        "p95_whole_image": round(whole_error["p95_after"], 4),
        "max_blockwise": round(block_error["max_after"], 4),
        "max_whole_image": round(whole_error["max_after"], 4),
        "seconds_blockwise": round(blockwise["wall"], 2),
        "seconds_blockwise_stage": stage.seconds,
        "seconds_whole_image": round(whole["seconds"], 2),
        "seconds_whole_image_elastix": round(whole["elastix_s"], 2),
        "block_compute_s": stage.block_seconds,
        "whole_image_matched_samples": samples,
        "rms_whole_image_matched_samples": round(matched_error["rms_after"], 4),
        "p95_whole_image_matched_samples": round(matched_error["p95_after"], 4),
        "seconds_whole_image_matched_samples": round(matched["seconds"], 2),
        "load_average": [load_before, load_average()],
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    })
    if owned:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
