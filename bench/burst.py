"""A morning's burst of ingest events (issue 21 items 2 and 5): 40 distinct volumes land
within a minute, each announced with `dreg emit-ingested`, then a second event for 10 of
them and 5 events that must be rejected; a process work pool with a concurrency limit of
2 on a PostgreSQL-backed `prefect server start`, every run on one external Dask cluster
(`dask scheduler` and 2 `dask worker`s; with --late-worker the second joins after the
first completion; with --kill-worker-after N the busiest worker's process is killed
once N runs have completed). The same code as tests/test_operations.py
(tests/load_platform.py), at full size.

Prints: events in, runs completed and failed, registrations, completion and failure
events, the time from the last event to the last completion, the server's CPU seconds
and peak RSS (with its children), the database's size, the tasks each Dask worker ran,
the blocks reused from the block store, and whether the outcome is what it must be
(`exactly_once`).

    python bench/burst.py [--volumes 40 --duplicates 10 --size 48 --late-worker]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the harness

from _common import (  # noqa: E402
    emit,
    exit_cleanly_on_sigterm,
    load_average,
    log,
    work_folder,
)


def main() -> None:
    import load_platform

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=40)
    parser.add_argument("--duplicates", type=int, default=10)
    parser.add_argument("--size", type=int, default=48, help="volume edge, voxels")
    parser.add_argument("--pool-limit", type=int, default=2)
    parser.add_argument("--late-worker", action="store_true",
                        help="start the second Dask worker after the first completion")
    parser.add_argument("--kill-worker-after", type=int, default=0, metavar="N",
                        help="SIGKILL the busiest Dask worker's process after N runs "
                             "completed (its nanny starts another)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    burst = load_platform.Burst(volumes=args.volumes, duplicates=args.duplicates,
                                size=args.size, pool_limit=args.pool_limit,
                                late_worker=args.late_worker,
                                kill_worker_after=args.kill_worker_after)
    load_start = load_average()
    with work_folder(args.dir, "dreg-bench-burst-", args.keep) as root:
        log(f"burst of {args.volumes} volumes in {root} (load average {load_start})")
        outcome = load_platform.run_burst(Path(root), burst)
    emit({**outcome.figures, "load_average": [load_start, load_average()]})


if __name__ == "__main__":
    main()
