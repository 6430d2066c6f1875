"""dreg in itk-dreg's configuration, and itk-dreg itself beside it when it is installed.

The configuration of issue 19 item 8: a size^3 synthetic pair (128 by default), blocks of
64 with overlap 0.25, an affine then a B-spline registration per block, a field at
factor 4, 2 workers. dreg runs it as a user would, as one command with QC:

    dreg register FIXED MOVING OUT --config peer.yaml --workers 2

with two block stages at level 0 (affine, then B-spline from the affine's field), on the
embedded defaults (Prefect's temporary API and a local cluster), or on the session's
API and cluster when PREFECT_API_URL and DREG_DASK_ADDRESS are set.

With `--itk-dreg PYTHON` (an interpreter that has the `itk_dreg` package), the same pair
(written as .mha) and the same two elastix parameter maps, the ones dreg's plan builds for
these stages, go through itk-dreg in one elastix run per block (bench/_itk_dreg_run.py:
its ElastixDRegBlockPairRegistrationMethod and ReduceToDisplacementFieldMethod on a
LocalCluster), alternating with dreg for `--repeats` pairs of runs. For each side: wall
and CPU seconds of the whole process with every process under it, the peak RSS of each
role of process, and the field's error against the truth (RMS of |u - u_true| in voxels
over the field voxels at least 2 from its border). Prints progress, then one JSON line:
the medians, `wall_ratio` and `cpu_ratio` (dreg / itk-dreg) and the targets
(`target_*`: wall at most 0.3x, CPU at most 0.5x, no dreg process at 1 GiB or more).

    .venv/bin/python bench/peer.py [--size 128] [--block 64] [--workers 2] [--repeats 3]
                                   [--itk-dreg /path/to/python] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, emit, load_average, log, make_pair, work_folder  # noqa: E402
from gigavoxel import MARGIN, field_error_streamed, run_command, run_step  # noqa: E402

FACTOR = 4
OVERLAP = 0.25
WALL_TARGET, CPU_TARGET, RSS_LIMIT_MB = 0.3, 0.5, 1024.0


def pipeline(block: int, iterations: int | None):
    """Affine then B-spline blocks, both at level 0 with a field at FACTOR."""
    from dreg.registration import PipelineConfig, StageConfig

    parameters = {"MaximumNumberOfIterations": iterations} if iterations else {}
    return PipelineConfig(stages=[
        StageConfig(name=name, level=0, block_size=block, overlap=OVERLAP,
                    transform=name, parameters=parameters, field_grid_factor=FACTOR)
        for name in ("affine", "bspline")])


def parameter_maps(config, block: int) -> list[dict]:
    """The elastix maps dreg's plan builds for the stages (the B-spline grid included)."""
    from dreg.registration.elastix import parameter_map, with_grid_spacing

    stages = [with_grid_spacing(stage, (block,) * 3) for stage in config.stages]
    return [parameter_map(stage.transform, stage.parameters) for stage in stages]


def write_mha(image_uri: str, path: Path) -> None:
    """Level 0 of an OME-Zarr image as a float32 .mha with its placement (the bench's
    pair is small enough to hold)."""
    import itk

    from dreg.io import ome_zarr
    from dreg.registration.elastix import to_itk_image

    opened = ome_zarr.open_image(image_uri)
    grid = opened.levels[0].grid
    whole = tuple(slice(0, n) for n in grid.shape_zyx)
    itk.imwrite(to_itk_image(ome_zarr.read_region(opened, 0, whole), grid), str(path))


def itk_field_error(field_path: Path, truth_uri: str) -> dict:
    """RMS and max of |u - u_true| in voxels of the truth's grid over an ITK displacement
    field's voxels at least MARGIN from its border (ITK: x, y, z vectors, moving - fixed
    point, as dreg's field)."""
    import itk
    import numpy as np

    from dreg.field import open_field, sample_field
    from dreg.grid import Grid

    image = itk.imread(str(field_path))
    vectors = np.asarray(itk.array_view_from_image(image), dtype=np.float64)  # z, y, x, 3
    grid = Grid(shape_zyx=vectors.shape[:3], spacing_xyz=tuple(image.GetSpacing()),
                origin_xyz=tuple(image.GetOrigin()),
                direction=tuple(map(tuple, np.asarray(image.GetDirection()))))
    interior = tuple(slice(MARGIN, n - MARGIN) for n in grid.shape_zyx)
    truth = open_field(truth_uri)
    to_voxels = np.linalg.inv(truth.levels[0].grid.index_to_world_matrix)
    u_true = sample_field(truth, grid.region_points(interior))
    error = np.linalg.norm((vectors[interior] - u_true) @ to_voxels.T, axis=-1)
    return {"rms_after": round(float(np.sqrt(np.mean(error ** 2))), 4),
            "max_after": round(float(error.max()), 4), "voxels_compared": int(error.size)}


def largest(figures: dict) -> float:
    return max(figures["peak_rss_mb_by_role"].values(), default=0.0)


def median_of(runs: list[dict], key: str, digits: int = 2) -> float:
    return round(statistics.median(run[key] for run in runs), digits)


def check_interpreter(python: str) -> None:
    """Exit with one line before any work when `python` cannot import itk_dreg."""
    try:
        found = subprocess.run([python, "-c", "import itk_dreg"], capture_output=True,
                               check=False, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        found = False
    if not found:
        sys.exit(f"--itk-dreg {python}: not a Python interpreter that can import itk_dreg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image edge, voxels")
    parser.add_argument("--block", type=int, default=64, help="block edge, voxels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=None,
                        help="elastix MaximumNumberOfIterations of both maps (default: the "
                             "presets')")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs")
    parser.add_argument("--itk-dreg", default=None, metavar="PYTHON",
                        help="an interpreter with itk_dreg: run itk-dreg beside dreg")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    if args.itk_dreg:
        check_interpreter(args.itk_dreg)
    workers = ["--workers", str(args.workers)]

    with work_folder(args.dir, "dreg-bench-peer-") as work:
        load_before = load_average()
        log(f"a {args.size}^3 pair in {work}, blocks of {args.block} (load {load_before})")
        pair = make_pair(work / "pair", args.size, workers=args.workers)
        config = pipeline(args.block, args.iterations)
        config_path = work / "peer.yaml"
        config_path.write_text(json.dumps(config.model_dump(mode="json")))
        peer_inputs = None
        if args.itk_dreg:
            log("writing the pair as .mha and the parameter maps for itk-dreg")
            peer_inputs = [work / "fixed.mha", work / "moving.mha", work / "params.json"]
            write_mha(pair["fixed"], peer_inputs[0])
            write_mha(pair["moving"], peer_inputs[1])
            peer_inputs[2].write_text(json.dumps(parameter_maps(config, args.block)))
        ours, theirs = [], []
        for repeat in range(args.repeats):
            out = work / f"out-{repeat}"
            run = run_step(f"dreg {repeat}", ["register", pair["fixed"], pair["moving"],
                                              str(out), "--config", str(config_path),
                                              *workers])
            figures = run["figures"]
            ours.append({**figures, "largest_mb": largest(figures), "qc": run["line"].get("qc"),
                         **field_error_streamed(str(out / "field.ome.zarr"), pair["truth"])})
            if peer_inputs:
                field = work / f"itk-dreg-{repeat}.mha"
                run = run_command(f"itk-dreg {repeat}", [
                    args.itk_dreg, str(REPO / "bench" / "_itk_dreg_run.py"),
                    *map(str, peer_inputs), str(field), "--block", str(args.block),
                    "--overlap", str(OVERLAP), "--factor", str(FACTOR), *workers])
                figures = run["figures"]
                theirs.append({**figures, "largest_mb": largest(figures),
                               "blocks": run["line"].get("blocks"),
                               **itk_field_error(field, pair["truth"])})

    figures = {
        "size": args.size, "block": args.block, "overlap": OVERLAP, "factor": FACTOR,
        "workers": args.workers, "repeats": args.repeats,
        "wall_s": median_of(ours, "wall_s"), "cpu_s": median_of(ours, "cpu_s"),
        "largest_process_mb": median_of(ours, "largest_mb"),
        "rms_before": ours[0]["rms_before"], "rms_after": median_of(ours, "rms_after", 4),
        "qc": [run["qc"] for run in ours],
        "target_rss": max(run["largest_mb"] for run in ours) < RSS_LIMIT_MB,
        "runs": ours,
    }
    if theirs:
        wall_ratio = figures["wall_s"] / median_of(theirs, "wall_s")
        cpu_ratio = figures["cpu_s"] / median_of(theirs, "cpu_s")
        figures.update({
            "itk_dreg": {"wall_s": median_of(theirs, "wall_s"),
                         "cpu_s": median_of(theirs, "cpu_s"),
                         "largest_process_mb": median_of(theirs, "largest_mb"),
                         "rms_after": median_of(theirs, "rms_after", 4), "runs": theirs},
            "wall_ratio": round(wall_ratio, 3), "cpu_ratio": round(cpu_ratio, 3),
            "target_wall": wall_ratio <= WALL_TARGET, "target_cpu": cpu_ratio <= CPU_TARGET,
        })
    log(f"dreg: {figures['wall_s']} s wall, {figures['cpu_s']} CPU-s, largest process "
        f"{figures['largest_process_mb']} MiB, RMS {figures['rms_after']}"
        + (f"; itk-dreg: {figures['itk_dreg']['wall_s']} s, {figures['itk_dreg']['cpu_s']} "
           f"CPU-s, RMS {figures['itk_dreg']['rms_after']}" if theirs else ""))
    emit({**figures, "load_average": [load_before, load_average()],
          "measured": time.strftime("%Y-%m-%d %H:%M")})


if __name__ == "__main__":
    main()
