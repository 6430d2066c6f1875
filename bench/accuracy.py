"""Accuracy of dreg's default pipeline against whole-image ITK-Elastix, case by case.

Each case is a pair with a known fixed-to-moving field (bench/_pairs.py), registered
twice in the same run:
- dreg: `register_images` with the default pipeline (a global affine at the coarsest
  level, then B-spline blocks at level 0), on a LocalCluster of single-threaded
  workers; then QC (`quality_control`, timed apart) for its verdict;
- whole image: elastix in this process on the whole level-0 arrays, affine then
  B-spline (16-voxel grid), 200 iterations and two resolutions each, with
  MaximumNumberOfThreads set to the number of workers so that both use the same cores
  (elastix's first use is paid before, untimed). Its transform is sampled on dreg's
  field grid and written as a field.
Both are scored the same way: RMS, 95th percentile and maximum of |u - u_true| in
voxels (2 field voxels from the border excluded; for a brain, only inside it), the share of
the field's voxels where det J <= 0 (over the whole field grid, border included) and
wall seconds; the brain cases also give Dice of the grey- and white-matter maps pulled
through each field, with the identity (before) and the truth (the ceiling that
interpolating the maps twice allows) beside them.

Cases (`--cases`, comma-separated; default all):
- synth128: `dreg synth` texture, 128^3, 1 voxel spacing, 3-voxel displacement;
- synth192-aniso: 192 x 192 x 96 voxels (x, y, z) of 1 x 1 x 2 (anisotropic);
- brain: the MNI ICBM152 2009a T1 (1 mm, 197 x 233 x 189) warped by a 3 mm field, the
  moving copy with a smooth intensity bias and noise;
- brain-t2: the same with a T2-like moving image (cross-modality).
The brain cases need nilearn (`pip install -e '.[bench]'`), whose wheel holds the
template. `--size` replaces every synthetic case's edge (for a quick look) and
`--iterations` every stage's MaximumNumberOfIterations (dreg's and elastix's).

    .venv/bin/python bench/accuracy.py [--cases synth128,brain] [--config pipeline.yaml]
                                       [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, in_flow_with_cluster, load_average, log  # noqa: E402

CASES = {
    "synth128": {"kind": "synth", "shape_zyx": (128, 128, 128), "spacing_xyz": (1.0, 1.0, 1.0)},
    "synth192-aniso": {"kind": "synth", "shape_zyx": (96, 192, 192),
                       "spacing_xyz": (1.0, 1.0, 2.0)},
    "brain": {"kind": "brain", "modality": "t1"},
    "brain-t2": {"kind": "brain", "modality": "t2"},
}
SYNTH_AMPLITUDE_VOXELS = 3.0
BRAIN_AMPLITUDE_MM = 3.0
WHOLE_IMAGE = {"iterations": 200, "resolutions": 2, "grid_spacing_voxels": 16}
TISSUES = ("gm", "wm")


def make_case(name: str, work: Path, size: int | None):
    import _pairs

    case = CASES[name]
    if case["kind"] == "brain":
        return _pairs.brain_pair(work / "pair", case["modality"], BRAIN_AMPLITUDE_MM)
    shape = case["shape_zyx"]
    if size:  # keep the case's proportions
        shape = tuple(max(8, round(n * size / max(shape))) for n in shape)
    return _pairs.synth_pair(work / "pair", shape, case["spacing_xyz"], SYNTH_AMPLITUDE_VOXELS)


def dreg_pipeline(config: str | None, iterations: int | None):
    """The default pipeline (or the one in the YAML file `config`), with every stage's
    iterations replaced when asked."""
    from dreg.registration.pipeline import default_pipeline, load_pipeline

    pipeline = load_pipeline(config) if config else default_pipeline()
    if iterations:
        for stage in pipeline.stages:
            stage.parameters = {**stage.parameters, "MaximumNumberOfIterations": iterations}
    return pipeline


def run_dreg(pair, out: Path, pipeline, address: str) -> dict:
    """The registration, then QC, each timed."""
    from flows.options import RunOptions
    from flows.qc import quality_control
    from flows.registration import register_images

    options = RunOptions(dask_address=address, overwrite=True, qc=False)
    started = time.perf_counter()
    result = register_images(fixed=pair.fixed, moving=pair.moving, out=str(out),
                             pipeline=pipeline, options=options)
    registered = time.perf_counter()
    report = quality_control(str(out), options=options)
    return {"field": result.field, "seconds": registered - started,
            "qc_seconds": time.perf_counter() - registered, "qc": report.qc,
            "qc_reason": report.reason,
            "blocks": {s.name: s.blocks for s in result.stages},
            "counts": {s.name: s.counts for s in result.stages}}


def whole_image_maps(threads: int, iterations: int | None) -> list[dict]:
    from dreg.registration import elastix

    common = {"NumberOfResolutions": WHOLE_IMAGE["resolutions"],
              "MaximumNumberOfIterations": iterations or WHOLE_IMAGE["iterations"]}
    return [elastix.parameter_map("affine", common, threads),
            elastix.parameter_map("bspline", {**common, "FinalGridSpacingInVoxels":
                                              WHOLE_IMAGE["grid_spacing_voxels"]}, threads)]


def run_whole_image(pair, field_grid, out: Path, threads: int,
                    iterations: int | None) -> dict:
    """Affine then B-spline over the whole images in one elastix run; its transform
    written as a field on `field_grid`."""
    import itk

    from dreg import field
    from dreg.io import ome_zarr
    from dreg.registration import elastix

    elastix.warm_up(threads)  # elastix's first use in this process, untimed
    fixed, moving = ome_zarr.open_image(pair.fixed), ome_zarr.open_image(pair.moving)
    grid = fixed.levels[0].grid
    everything = tuple(slice(0, n) for n in grid.shape_zyx)
    fixed_image = elastix.to_itk_image(ome_zarr.read_region(fixed, 0, everything), grid)
    moving_image = elastix.to_itk_image(ome_zarr.read_region(moving, 0, everything), grid)
    parameters = itk.ParameterObject.New()
    for pmap in whole_image_maps(threads, iterations):
        parameters.AddParameterMap(pmap)
    started = time.perf_counter()
    method = itk.ElastixRegistrationMethod.New(fixed_image, moving_image)
    method.SetParameterObject(parameters)
    method.SetLogToConsole(False)
    method.SetLogToFile(False)
    method.Update()
    transform = method.ConvertToItkTransform(method.GetCombinationTransform())
    seconds = time.perf_counter() - started
    image = field.create_field(str(out), field_grid, overwrite=True)
    ome_zarr.write_region(image, 0, tuple(slice(0, n) for n in field_grid.shape_zyx),
                          elastix.displacement_on_grid(transform, field_grid))
    return {"field": image.uri, "seconds": seconds}


def field_errors(field_uri: str, pair) -> dict:
    """RMS, 95th percentile and maximum of |u - u_true| in voxels, and the RMS of
    |u_true| (before), over the field's voxels at least 2 from its border; for a brain,
    only those inside it (where the fixed image is not 0: the template is skull-stripped),
    since outside the brain nothing tells a registration where to go."""
    from dreg.field import open_field, sample_field
    from dreg.grid import components_to_vectors
    from dreg.io import ome_zarr
    from dreg.qc.accuracy import field_error

    if pair.tissues_fixed is None:
        return field_error(field_uri, pair.truth)
    image = open_field(field_uri)
    grid = image.levels[0].grid
    inner = tuple(slice(2, n - 2) for n in grid.shape_zyx)
    u = components_to_vectors(ome_zarr.read_region(image, 0, inner))
    points = grid.region_points(inner)
    u_true = sample_field(open_field(pair.truth), points)
    fixed = ome_zarr.open_image(pair.fixed)
    fixed_grid = fixed.levels[0].grid
    voxels = np.rint(fixed_grid.world_to_index(points)).astype(int)
    inside = np.all((voxels >= 0) & (voxels < np.array(fixed_grid.shape_zyx)), axis=-1)
    voxels = np.clip(voxels, 0, np.array(fixed_grid.shape_zyx) - 1)
    values = ome_zarr.read_region(fixed, 0, tuple(slice(0, n) for n in fixed_grid.shape_zyx))
    brain = inside & (values[voxels[..., 0], voxels[..., 1], voxels[..., 2]] > 0)
    to_voxels = np.linalg.inv(fixed_grid.index_to_world_matrix)
    error = np.linalg.norm((u - u_true)[brain] @ to_voxels.T, axis=-1)
    before = np.linalg.norm(u_true[brain] @ to_voxels.T, axis=-1)
    return {"rms_before": float(np.sqrt(np.mean(before**2))),
            "rms_after": float(np.sqrt(np.mean(error**2))),
            "p95_after": float(np.percentile(error, 95)), "max_after": float(error.max())}


def folded_share(field_uri: str) -> dict:
    """Share of the field's voxels with det J <= 0, and the smallest det J."""
    from dreg.field import open_field
    from dreg.io import ome_zarr
    from dreg.qc.jacobian import determinant

    image = open_field(field_uri)
    grid = image.levels[0].grid
    u = ome_zarr.read_region(image, 0, tuple(slice(0, n) for n in grid.shape_zyx))
    det = determinant(u, grid)
    return {"folded_share": float(np.mean(det <= 0)), "min_det": float(det.min())}


def pulled_through(field_uri: str | None, grid, source: np.ndarray) -> np.ndarray:
    """source(x + u(x)) on every voxel of `grid` (identity when no field), trilinear."""
    import _pairs

    from dreg.field import open_field, sample_field

    if field_uri is None:
        return _pairs.pulled(source, grid)
    image = open_field(field_uri)
    return _pairs.pulled(source, grid, lambda points: sample_field(image, points))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float(2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))


def tissue_dice(pair, fields: dict[str, str | None]) -> dict:
    """Dice of each tissue map pulled through each field against the fixed's map."""
    scores = {}
    for who, uri in fields.items():
        for tissue in TISSUES:
            pulled = pulled_through(uri, pair.grid, pair.tissues_moving[tissue])
            scores[f"dice_{tissue}_{who}"] = round(dice(pair.tissues_fixed[tissue], pulled), 4)
    return scores


def run_case(name: str, work: Path, args, address: str) -> dict:
    """One case: its pair, dreg on the cluster at `address`, the whole image here."""
    from dreg.field import open_field

    load_before = load_average()
    started = time.perf_counter()
    pair = make_case(name, work, args.size)
    log(f"{name}: pair of {pair.grid.shape_zyx} (z, y, x) voxels of {pair.grid.spacing_xyz} "
        f"made in {time.perf_counter() - started:.1f} s")
    blockwise = run_dreg(pair, work / "dreg", dreg_pipeline(args.config, args.iterations), address)
    field_grid = open_field(blockwise["field"]).levels[0].grid
    whole = run_whole_image(pair, field_grid, work / "whole-image.ome.zarr", args.workers,
                            args.iterations)
    figures: dict = {"shape_zyx": list(pair.grid.shape_zyx),
                     "spacing_xyz": list(pair.grid.spacing_xyz),
                     "blocks": blockwise["blocks"], "counts": blockwise["counts"],
                     "qc": blockwise["qc"], "qc_reason": blockwise["qc_reason"]}
    for who, run in (("dreg", blockwise), ("elastix", whole)):
        error = field_errors(run["field"], pair)
        figures["rms_before"] = round(error["rms_before"], 4)
        figures[f"rms_{who}"] = round(error["rms_after"], 4)
        figures[f"p95_{who}"] = round(error["p95_after"], 4)
        figures[f"max_{who}"] = round(error["max_after"], 4)
        folds = folded_share(run["field"])
        figures[f"folded_share_{who}"] = round(folds["folded_share"], 6)
        figures[f"min_det_{who}"] = round(folds["min_det"], 4)
        figures[f"seconds_{who}"] = round(run["seconds"], 2)
    figures["seconds_dreg_qc"] = round(blockwise["qc_seconds"], 2)
    figures["rms_ratio"] = round(figures["rms_dreg"] / figures["rms_elastix"], 3)
    truth_folds = folded_share(pair.truth)
    figures["min_det_truth"] = round(truth_folds["min_det"], 4)
    if pair.tissues_fixed is not None:
        figures.update(tissue_dice(pair, {"before": None, "truth": pair.truth,
                                          "dreg": blockwise["field"],
                                          "elastix": whole["field"]}))
    figures["load_average"] = [load_before, load_average()]
    log(f"{name}: RMS {figures['rms_before']} -> dreg {figures['rms_dreg']} "
        f"({figures['seconds_dreg']} s, QC {figures['qc']}), whole image "
        f"{figures['rms_elastix']} ({figures['seconds_elastix']} s): ratio "
        f"{figures['rms_ratio']}; folded {figures['folded_share_dreg']} / "
        f"{figures['folded_share_elastix']}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--size", type=int, default=None,
                        help="longest edge of the synthetic cases, voxels (default: each "
                             "case's own)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="MaximumNumberOfIterations of every stage (default: dreg's "
                             "defaults; 200 for the whole image)")
    parser.add_argument("--config", default=None,
                        help="a pipeline YAML file for dreg (default: the built-in pipeline)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown or not names:
        parser.error(f"unknown case(s) {', '.join(unknown) or '(none)'}; "
                     f"choose from {', '.join(CASES)}")

    owned = args.dir is None
    work = Path(args.dir or tempfile.mkdtemp(prefix="dreg-bench-accuracy-"))
    cases = in_flow_with_cluster(
        args.workers,
        lambda cluster: {name: run_case(name, work / name, args, cluster.scheduler_address)
                         for name in names},
        name="dreg-bench-accuracy")
    emit({
        "cases": cases,
        "worst_rms_ratio": max(c["rms_ratio"] for c in cases.values()),
        "worst_folded_share_dreg": max(c["folded_share_dreg"] for c in cases.values()),
        "qc_all_ok": all(c["qc"] == "ok" for c in cases.values()),
        "workers": args.workers,
        "iterations": args.iterations,
        "pipeline": args.config or "default",
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    })
    if owned:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
