"""Peak memory against image size: a worker's should not grow with the image.

For each size (default 256 and 1024), makes a `dreg synth` pair of size^3 out of core on
disk (in a child process), registers it with the same cheap one-stage pipeline (a
translation transform at level 0, blocks of 128, a few elastix iterations, one
resolution) on a FRESH LocalCluster of single-threaded workers, asks each worker for its
peak RSS (resource.getrusage), then removes the pair and the output. The flow process's
peak RSS is read after each size (the temporary Prefect server is a separate process and
not counted). Before making a pair it checks the free disk space (the pair needs about
(2 x 1.15 + 3) x 4 x size^3 bytes: fixed and moving with their pyramids, and the truth
field), and skips a size that would not fit, saying so.

    .venv/bin/python bench/memory.py [--sizes 256,1024] [--block 128] [--iterations 16]
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
    worker_peak_rss_mb,
)

GIB = 1 << 30


def pair_bytes(size: int) -> int:
    """Disk for a synth pair (uncompressed bound): two images with pyramids, a 3-vector
    truth, plus the registration output's fields (about a third of an image each)."""
    return int((2 * 8 / 7 + 3 + 1) * 4 * size**3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024", help="image edges, comma-separated")
    parser.add_argument("--block", type=int, default=128, help="block edge, voxels")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--iterations", type=int, default=16,
                        help="elastix MaximumNumberOfIterations (one resolution)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    owned = args.dir is None
    work = Path(args.dir or tempfile.mkdtemp(prefix="dreg-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    pipeline = stage_pipeline("translation", args.block, args.overlap,
                              {"MaximumNumberOfIterations": args.iterations,
                               "NumberOfResolutions": 1})
    load_before = load_average()
    figures: dict = {"sizes": [], "block": args.block, "overlap": args.overlap,
                     "iterations": args.iterations, "transform": "translation",
                     "workers": args.workers}
    skipped = []
    for size in sizes:
        free = shutil.disk_usage(work).free
        need = pair_bytes(size)
        log(f"{size}^3: needs about {need / GIB:.1f} GiB of disk, {free / GIB:.1f} GiB free")
        if need > 0.95 * free:
            log(f"{size}^3: skipped, the disk cannot hold it")
            skipped.append(size)
            continue
        pair_dir = work / f"pair-{size}"
        started = time.perf_counter()
        log(f"making a {size}^3 pair in {pair_dir}")
        pair = make_pair(pair_dir, size)
        synth_s = time.perf_counter() - started
        log(f"pair made in {synth_s:.0f} s; registering on a fresh cluster of "
            f"{args.workers} workers")

        def body(cluster, pair=pair, size=size) -> dict:
            run = register(pair, work / f"out-{size}", pipeline, cluster.scheduler_address)
            run["workers"] = worker_peak_rss_mb(cluster.scheduler_address)
            return run

        run = in_flow_with_cluster(args.workers, body, name=f"dreg-bench-memory-{size}")
        (stage,) = run["result"].stages
        workers = run["workers"]
        flow_peak = peak_rss_mb()
        log(f"{size}^3: {stage.blocks} blocks {stage.counts}, register "
            f"{stage.register_seconds} s, reduce {stage.reduce_seconds} s; worker peak "
            f"RSS {workers} MiB, flow process {flow_peak:.0f} MiB so far")
        figures["sizes"].append(size)
        figures[f"worker_peak_rss_mb_{size}"] = max(workers)
        figures[f"worker_peak_rss_mb_all_{size}"] = workers
        figures[f"flow_peak_rss_mb_after_{size}"] = round(flow_peak, 1)
        figures[f"blocks_{size}"] = stage.blocks
        figures[f"counts_{size}"] = stage.counts
        figures[f"register_s_{size}"] = stage.register_seconds
        figures[f"reduce_s_{size}"] = stage.reduce_seconds
        figures[f"synth_s_{size}"] = round(synth_s, 1)
        shutil.rmtree(pair_dir, ignore_errors=True)
        shutil.rmtree(work / f"out-{size}", ignore_errors=True)

    if len(figures["sizes"]) >= 2:
        small, large = figures["sizes"][0], figures["sizes"][-1]
        a, b = figures[f"worker_peak_rss_mb_{small}"], figures[f"worker_peak_rss_mb_{large}"]
        figures["worker_peak_growth"] = round(b / a - 1, 3)
    figures["flow_peak_rss_mb"] = round(peak_rss_mb(), 1)
    figures["skipped_sizes"] = skipped
    figures["load_average"] = [load_before, load_average()]
    figures["measured"] = time.strftime("%Y-%m-%d %H:%M")
    if owned:
        shutil.rmtree(work, ignore_errors=True)
    emit(figures)


if __name__ == "__main__":
    main()
