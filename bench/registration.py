"""Whole-run figures of a block-wise registration on a synthetic pair.

Makes a `dreg synth` pair, registers it with one B-spline block stage on a LocalCluster
of N single-threaded workers, warmed first (Prefect's temporary API unless
PREFECT_API_URL is set; the cluster DREG_DASK_ADDRESS names, as it is, when set), and
prints progress, then one JSON line: wall seconds, seconds registering blocks and
reducing, field voxels per second of the reduce, peak RSS of the flow process and of
each worker, RMS error before/after.

    .venv/bin/python bench/registration.py [--size 128] [--block 64] [--overlap 0.25]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    emit,
    in_flow_with_cluster,
    log,
    peak_rss_mb,
    register,
    worker_peak_rss_mb,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=256)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from dreg import synth
    from dreg.grid import Grid
    from dreg.qc.accuracy import field_error
    from dreg.registration import PipelineConfig, StageConfig

    work = Path(args.dir or tempfile.mkdtemp(prefix="dreg-bench-"))
    log(f"making a {args.size}^3 pair in {work}")
    pair = synth.write_pair(str(work / "pair"), Grid((args.size,) * 3, (1.0, 1.0, 1.0)),
                            seed=1, amplitude_voxels=2.0, overwrite=True)
    pipeline = PipelineConfig(stages=[StageConfig(
        name="bspline", level=0, block_size=args.block, overlap=args.overlap,
        transform="bspline", parameters={"MaximumNumberOfIterations": args.iterations})])

    def body(cluster) -> dict:
        # Inside a flow so the temporary API is up before the workers start; the workers
        # warmed (elastix's first use) before the timing starts.
        run = register(pair, work / "out", pipeline, cluster.scheduler_address)
        run["workers"] = worker_peak_rss_mb(cluster.scheduler_address)
        return run

    log("registering")
    run = in_flow_with_cluster(args.workers, body, name="dreg-bench")
    (stage,) = run["result"].stages
    error = field_error(run["result"].field, pair["truth"])
    emit({
        "size": args.size, "block": args.block, "overlap": args.overlap,
        "workers": args.workers, "iterations": args.iterations, "blocks": stage.blocks,
        "wall_s": round(run["wall"], 2),
        "register_s": stage.register_seconds,
        "block_compute_s": stage.block_seconds,
        "reduce_s": stage.reduce_seconds,
        "field_voxels": stage.field_voxels,
        "reduce_field_voxels_per_s": round(stage.field_voxels / stage.reduce_seconds),
        "flow_peak_rss_mb": round(peak_rss_mb(), 1),
        "worker_peak_rss_mb": run["workers"],
        "rms_before": round(error["rms_before"], 4),
        "rms_after": round(error["rms_after"], 4),
        "p95_after": round(error["p95_after"], 4),
    })


if __name__ == "__main__":
    main()
