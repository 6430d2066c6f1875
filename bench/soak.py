"""A soak (issue 21 item 3): the nightly batch of 20 pairs, run 5 times in a row through
the register-scheduled deployment on one PostgreSQL-backed `prefect server start`, one
process worker and one external Dask cluster (`dask scheduler`, 2 `dask worker`s). After
each batch: its seconds, the registrations it finished, and the RSS of the server (with
its children) and of the scheduler, and the task payloads the scheduler still holds; then
the memory's growth from the first batch to the last.
The same code as tests/test_operations.py (tests/load_platform.py), at full size.

    python bench/soak.py [--batches 5 --pairs 20 --size 48]
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
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--size", type=int, default=48, help="volume edge, voxels")
    parser.add_argument("--scheduler-log-length", type=int,
                        default=load_platform.SCHEDULER_LOG_LENGTH, metavar="N",
                        help="the scheduler's distributed.admin.low-level-log-length "
                             "(default: %(default)s, as docs/operations.md sets it; Dask's "
                             "own default, 1000, keeps every task run's payload)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    volumes = load_platform.Burst(volumes=args.pairs, duplicates=0, size=args.size)
    load_start = load_average()
    with work_folder(args.dir, "dreg-bench-soak-", args.keep) as root:
        root = Path(root)
        log(f"soak of {args.batches} batches of {args.pairs} pairs in {root} "
            f"(load average {load_start})")
        inputs = load_platform.write_volumes(str(root), volumes)
        settings = load_platform.burst_settings(root, inputs, volumes)
        with load_platform.platform(root, settings, pool_limit=1, dask_workers=2,
                                    scheduler_log_length=args.scheduler_log_length) as running:
            rows = load_platform.soak_on(running, inputs["reference"], inputs["volumes"],
                                         args.batches)
    emit({"batches": args.batches, "pairs": args.pairs, "size": args.size,
          "scheduler_log_length": args.scheduler_log_length,
          "all_registered": all(r["registered"] == args.pairs for r in rows),
          "server_rss_growth_pct": load_platform.growth(rows, "server_rss_mb"),
          "scheduler_rss_growth_pct": load_platform.growth(rows, "scheduler_rss_mb"),
          "batch_rows": rows, "load_average": [load_start, load_average()]})


if __name__ == "__main__":
    main()
