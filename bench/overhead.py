"""Orchestration overhead per block: a stage of many cheap blocks.

Registers a `dreg synth` pair of size^3 with one translation stage of small blocks (by
default 1000 blocks of 16^3 on 160^3, a few elastix iterations each), on a LocalCluster
of single-threaded workers, and compares the stage's register wall time with the
seconds its blocks computed:

    overhead_s_per_block = (register_seconds - block_seconds / workers) / blocks

register_seconds, block_seconds and blocks come from the stage summary in
result.stages. The Prefect API is the temporary one, or with --server a real
`prefect server start` (SQLite in a temporary folder) that this script starts and stops.
--profile prints cProfiles of the registration (stderr): the flow process's main thread
and each worker's task thread.

    .venv/bin/python bench/overhead.py [--size 160 | --blocks N] [--block 16] [--iterations 8]
                                       [--workers 2] [--server] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    cpu_seconds_by_role,
    cpu_used_by_role,
    emit,
    in_flow_with_cluster,
    load_average,
    log,
    make_pair,
    peak_rss_mb,
    prefect_api_kind,
    prefect_server,
    profile_workers,
    register,
    stage_pipeline,
    worker_peak_rss_mb,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160, help="image edge, voxels")
    parser.add_argument("--blocks", type=int, default=None,
                        help="about this many blocks: sets --size to the nearest cube of "
                             "blocks (e.g. 10000 gives 22^3 blocks)")
    parser.add_argument("--block", type=int, default=16, help="block edge, voxels")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--iterations", type=int, default=8,
                        help="elastix MaximumNumberOfIterations (one resolution)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--server", action="store_true",
                        help="run against a real `prefect server start` on a free port")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the flow process during the registration (stderr)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    if args.blocks:
        args.size = round(args.blocks ** (1 / 3)) * args.block

    owned = args.dir is None
    work = Path(args.dir or tempfile.mkdtemp(prefix="dreg-bench-overhead-"))
    load_before = load_average()
    log(f"making a {args.size}^3 pair in {work} (load average {load_before})")
    pair = make_pair(work / "pair", args.size)
    pipeline = stage_pipeline("translation", args.block, args.overlap,
                              {"MaximumNumberOfIterations": args.iterations,
                               "NumberOfResolutions": 1})

    def body(cluster) -> dict:
        address = cluster.scheduler_address
        profiler, workers_profiled = None, contextlib.nullcontext({})
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            workers_profiled = profile_workers(address)
        with workers_profiled as worker_reports:
            if profiler is not None:
                profiler.enable()
            cpu_before = cpu_seconds_by_role()
            run = register(pair, work / "out", pipeline, address)
            run["cpu"] = cpu_used_by_role(cpu_before, cpu_seconds_by_role())
            if profiler is not None:
                profiler.disable()
        if profiler is not None:
            import pstats

            log("--- flow process (main thread) ---")
            stats = pstats.Stats(profiler, stream=sys.stderr)
            stats.sort_stats("cumulative").print_stats(30)
            stats.sort_stats("tottime").print_stats(20)
            for worker, report in worker_reports.items():
                log(f"--- worker {worker} (task thread) ---\n{report}")
        run["workers"] = worker_peak_rss_mb(address)
        return run

    server = prefect_server() if args.server else contextlib.nullcontext()
    with server as server_url:
        api = "prefect server " + server_url if server_url else prefect_api_kind()
        log(f"registering with {args.workers} workers, Prefect API: {api}")
        run = in_flow_with_cluster(args.workers, body, name="dreg-bench-overhead")

    (stage,) = run["result"].stages
    blocks = stage.blocks
    compute_per_worker = stage.block_seconds / args.workers
    overhead = (stage.register_seconds - compute_per_worker) / blocks
    log(f"{blocks} blocks: register {stage.register_seconds} s, block compute "
        f"{stage.block_seconds} s over {args.workers} workers; "
        f"overhead {overhead:.4f} s per block")
    emit({
        "size": args.size, "block": args.block, "overlap": args.overlap,
        "iterations": args.iterations, "workers": args.workers,
        "prefect_api": "server" if args.server else prefect_api_kind(),
        "blocks": blocks, "counts": stage.counts,
        "register_s": stage.register_seconds,
        "block_compute_s": stage.block_seconds,
        "block_compute_s_mean": round(stage.block_seconds / blocks, 4),
        "reduce_s": stage.reduce_seconds,
        "stage_s": stage.seconds,
        "wall_s": round(run["wall"], 2),
        "overhead_s_per_block": round(overhead, 4),
        # CPU seconds spent during the whole registration by the flow process (with the
        # Dask scheduler), the workers and the Prefect server, per block.
        "cpu_s_per_block": {role: round(seconds / blocks, 4)
                            for role, seconds in run["cpu"].items()},
        "flow_peak_rss_mb": round(peak_rss_mb(), 1),
        "worker_peak_rss_mb": run["workers"],
        "load_average": [load_before, load_average()],
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    })
    if owned:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
