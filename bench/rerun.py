"""First run against a fully stored re-run, and the fixed cost of each.

Makes a `dreg synth` pair of size^3 (default 96), then runs `dreg register` on it with
the built-in pipeline twice, as a user would (a fresh process each time; the second with
--overwrite, so every block is found in the block store). With --server both runs talk
to a real `prefect server start` started here first; without it each run starts
Prefect's temporary server, as the embedded defaults do, unless PREFECT_API_URL names an
API (the figures' `prefect` says which: server, temporary or external).

Fixed cost: a run's wall time minus its block compute (each stage's block seconds over
the workers) and its reduce seconds; what is left is start-up (Python, Prefect, the
cluster), planning, Prefect's bookkeeping and the writes of the records.

    .venv/bin/python bench/rerun.py [--size 96] [--workers 2] [--server] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    REPO,
    emit,
    load_average,
    log,
    make_pair,
    prefect_api_kind,
    prefect_server,
)

QUICK_PIPELINE = """\
stages:
  - name: translation
    level: 0
    block_size: 16
    transform: translation
    parameters:
      MaximumNumberOfIterations: 2
      NumberOfResolutions: 1
"""


def register(pair: dict, out: Path, workers: int, *extra: str) -> tuple[float, dict]:
    """One `dreg register` in a fresh process: wall seconds and its last JSON line."""
    command = [sys.executable, "-m", "cli.main", "register", pair["fixed"], pair["moving"],
               str(out), "--workers", str(workers), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"dreg register failed: {done.stderr.strip()[-2000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def fixed_cost(wall: float, out: Path, workers: int) -> float:
    """Wall time minus block compute (over the workers) and reduce time."""
    result = json.loads((out / "result.json").read_text())
    work = sum(s["block_seconds"] / workers + s["reduce_seconds"] for s in result["stages"])
    return wall - work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="image edge, voxels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--server", action="store_true",
                        help="both runs against a real `prefect server start`")
    parser.add_argument("--quick", action="store_true",
                        help="a one-stage translation pipeline instead of the built-in one "
                             "(for a smoke test)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="dreg-bench-rerun-"))
    work.mkdir(parents=True, exist_ok=True)
    pair = make_pair(work / "pair", args.size)
    out = work / "out"
    extra: list[str] = []
    if args.quick:
        (work / "pipeline.yaml").write_text(QUICK_PIPELINE)
        extra = ["--config", str(work / "pipeline.yaml")]
    server = prefect_server() if args.server else contextlib.nullcontext()
    with server:
        first_wall, first = register(pair, out, args.workers, *extra)
        log(f"first run: {first_wall:.1f} s, reused {first['blocks_reused']}")
        first_fixed = fixed_cost(first_wall, out, args.workers)
        again_wall, again = register(pair, out, args.workers, *extra, "--overwrite")
        log(f"re-run: {again_wall:.1f} s, reused {again['blocks_reused']}")
        again_fixed = fixed_cost(again_wall, out, args.workers)
    emit({
        "size": args.size,
        "workers": args.workers,
        "prefect": "server" if args.server else prefect_api_kind(),
        "first_s": round(first_wall, 1),
        "rerun_s": round(again_wall, 1),
        "rerun_ratio": round(again_wall / first_wall, 3),
        "first_fixed_s": round(first_fixed, 1),
        "rerun_fixed_s": round(again_fixed, 1),
        "blocks": first["block_counts"],
        "blocks_reused": again["blocks_reused"],
        "load_average": load_average(),
    })


if __name__ == "__main__":
    main()
