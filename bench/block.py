"""One block through elastix: CPU seconds and error against the truth, per parameter map.

Makes a `dreg synth` pair of size^3 (80 = a 64^3 block of the default pipeline with its
padding) and registers it whole, as one block, in this process on one thread, with
dreg's B-spline preset and with the variants that undo one of its choices at a time:

- `elastix_default`: elastix's own default B-spline map as dreg used it before
  (TransformBendingEnergyPenalty beside Mattes MI, the step-size estimation's Jacobian
  terms from as many samples as the transform has parameters, elastix resamples the
  result image);
- `with_penalty`: the preset plus elastix's default penalty (weight 1);
- `all_jacobian_measurements`: the preset with elastix's default number of Jacobian
  measurements;
- `elastix_result_image`: the preset with the result image resampled by elastix too.

Each variant is timed on the registration itself (`dreg.registration.elastix.register`,
including its result image), after elastix's first use is paid. The error is the RMS
of |u - u_true| in voxels over the block's voxels at least `--margin` from its border.

    .venv/bin/python bench/block.py [--size 80] [--iterations 256] [--repeats 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, load_average, log, make_pair, work_folder  # noqa: E402

PENALTY = {"Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"],
           "Metric1Weight": 1.0}
# (overrides added to the preset, keys removed from the preset's map)
VARIANTS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "preset": ({}, ()),
    "elastix_default": ({**PENALTY, "WriteResultImage": True},
                        ("NumberOfJacobianMeasurements",)),
    "with_penalty": (PENALTY, ()),
    "all_jacobian_measurements": ({}, ("NumberOfJacobianMeasurements",)),
    "elastix_result_image": ({"WriteResultImage": True}, ()),
}


def read_level0(uri: str):
    from dreg.field import open_field
    from dreg.io import ome_zarr

    image = open_field(uri) if uri.endswith("truth.ome.zarr") else ome_zarr.open_image(uri)
    return ome_zarr.read_region(image, 0, tuple(slice(0, n)
                                                for n in image.levels[0].grid.shape_zyx))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=80, help="block edge, voxels")
    parser.add_argument("--iterations", type=int, default=256,
                        help="elastix MaximumNumberOfIterations per resolution")
    parser.add_argument("--margin", type=int, default=8, help="voxels left out at the border")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant (best kept)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    import numpy as np

    from dreg.io import ome_zarr
    from dreg.registration import elastix

    with work_folder(args.dir, "dreg-bench-block-") as work:
        log(f"making a {args.size}^3 pair in {work} (load average {load_average()})")
        pair = make_pair(work / "pair", args.size, seed=3, workers=1)
        fixed = read_level0(pair["fixed"]).astype(np.float32)
        moving = read_level0(pair["moving"]).astype(np.float32)
        truth = read_level0(pair["truth"])
        grid = ome_zarr.open_image(pair["fixed"]).levels[0].grid
        elastix.warm_up(1)
        inner = (slice(None),) + (slice(args.margin, args.size - args.margin),) * 3
        figures: dict = {"size": args.size, "iterations": args.iterations,
                         "rms_before": round(float(np.sqrt(np.mean(
                             np.sum(truth[inner] ** 2, axis=0)))), 4)}
        for name, (overrides, dropped) in VARIANTS.items():
            pmap = elastix.parameter_map(
                "bspline", {"MaximumNumberOfIterations": args.iterations, **overrides}, 1)
            for key in dropped:
                pmap.pop(key)
            best = None
            for _ in range(args.repeats):
                started = time.process_time()
                result = elastix.register(fixed, moving, grid, pmap)
                cpu = time.process_time() - started
                best = cpu if best is None else min(best, cpu)
            u = elastix.displacement_on_grid(result.transform, grid)
            error = np.sqrt(np.mean(np.sum((u - truth)[inner] ** 2, axis=0)))
            figures[f"cpu_s_{name}"] = round(best, 2)
            figures[f"rms_{name}"] = round(float(error), 4)
            log(f"{name}: {best:.2f} CPU-s, RMS {error:.4f} voxels")
        figures["cpu_ratio"] = round(figures["cpu_s_elastix_default"] / figures["cpu_s_preset"], 2)
        figures["load_average"] = load_average()
        figures["measured"] = time.strftime("%Y-%m-%d %H:%M")
        emit(figures)


if __name__ == "__main__":
    main()
