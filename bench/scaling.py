"""Parallel efficiency: the same B-spline block stage on 1 and on 2 workers.

Makes a `dreg synth` pair of size^3 and registers it twice with the same one-stage
B-spline pipeline (into two output folders, so no block is served from the cache): first
on a LocalCluster of two (--workers) single-threaded workers, all warmed and importing the
task modules before timing; then, after scaling the same cluster down to one worker
(already warm: scaling up instead would pay elastix's first use again, about 10 s), on
one. The workers' first Prefect task runs fall in the two-worker run. With t1 and t2 the
stage's register wall seconds (result.stages[0].register_seconds):

    parallel_efficiency = t1 / (2 * t2)

    .venv/bin/python bench/scaling.py [--size 128] [--block 32] [--iterations 64]
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
    peak_rss_mb,
    register,
    stage_pipeline,
)


def wait_for_worker_count(client, count: int, timeout: float = 120.0) -> None:
    """Wait until the scheduler knows exactly `count` workers (after a scale down)."""
    deadline = time.monotonic() + timeout
    while len(client.scheduler_info(n_workers=-1)["workers"]) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster did not come to {count} worker(s) in {timeout} s")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image edge, voxels")
    parser.add_argument("--block", type=int, default=32, help="block edge, voxels")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--iterations", type=int, default=64,
                        help="elastix MaximumNumberOfIterations")
    parser.add_argument("--workers", type=int, default=2,
                        help="the larger cluster (the smaller has one worker)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    owned = args.dir is None
    work = Path(args.dir or tempfile.mkdtemp(prefix="dreg-bench-scaling-"))
    load_before = load_average()
    log(f"making a {args.size}^3 pair in {work} (load average {load_before})")
    pair = make_pair(work / "pair", args.size)
    pipeline = stage_pipeline("bspline", args.block, args.overlap,
                              {"MaximumNumberOfIterations": args.iterations})

    def body(cluster) -> dict:
        from distributed import Client

        runs = {}
        for workers in (args.workers, 1):
            if workers < args.workers:
                cluster.scale(workers)
                with Client(cluster.scheduler_address) as client:
                    wait_for_worker_count(client, workers)
            log(f"registering on {workers} worker(s)")
            run = register(pair, work / f"out-{workers}", pipeline, cluster.scheduler_address)
            (stage,) = run["result"].stages
            log(f"{workers} worker(s): register {stage.register_seconds} s, block compute "
                f"{stage.block_seconds} s, {stage.blocks} blocks")
            runs[workers] = {"stage": stage, "wall": run["wall"]}
        return runs

    runs = in_flow_with_cluster(args.workers, body, name="dreg-bench-scaling")
    one, many = runs[1]["stage"], runs[args.workers]["stage"]
    t1, t2 = one.register_seconds, many.register_seconds
    efficiency = t1 / (args.workers * t2)
    log(f"parallel efficiency {efficiency:.3f} (t1 {t1} s, t{args.workers} {t2} s)")
    emit({
        "size": args.size, "block": args.block, "overlap": args.overlap,
        "iterations": args.iterations, "blocks": one.blocks,
        "counts": [one.counts, many.counts],
        "t1_register_s": t1, f"t{args.workers}_register_s": t2,
        "t1_block_compute_s": one.block_seconds,
        f"t{args.workers}_block_compute_s": many.block_seconds,
        "t1_reduce_s": one.reduce_seconds, f"t{args.workers}_reduce_s": many.reduce_seconds,
        "parallel_efficiency": round(efficiency, 3),
        "workers": args.workers,
        "flow_peak_rss_mb": round(peak_rss_mb(), 1),
        "load_average": [load_before, load_average()],
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    })
    if owned:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
