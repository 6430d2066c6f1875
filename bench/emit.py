"""The cost of announcing a volume (issue 21 item 2): `dreg emit-ingested` against the
yardstick, Prefect's own client sending the same event (`prefect.events.emit_event` in a
process of its own), each followed by the same wait until the server has stored the
event. Both run the same number of times, alternately, against one Prefect server:
PREFECT_API_URL if set, else a `prefect server start` of its own.

Prints: CPU seconds (user + system, the process and its children) and wall seconds per
call for each, and `cpu_ratio`, the yardstick's CPU over dreg's.

    python bench/emit.py [--calls 10]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from contextlib import ExitStack
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

BIN = Path(sys.executable).parent
YARDSTICK = """
import sys
from prefect.events import emit_event
from prefect.settings import PREFECT_API_URL
from flows.events import INGESTED, confirm_delivered, volume_resource_id
uri = sys.argv[1]
event = emit_event(event=INGESTED, payload={"uri": uri, "version": "v1"},
                   resource={"prefect.resource.id": volume_resource_id(uri),
                             "dreg.uri": uri, "dreg.version": "v1"})
confirm_delivered(PREFECT_API_URL.value(), str(event.id))
"""


def timed(args: list[str], env: dict) -> tuple[float, float]:
    """Run a command to its end; its CPU seconds (with its children) and wall seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, timeout=120)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10, help="calls of each")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    load_start = load_average()
    with work_folder(args.dir, "dreg-bench-emit-", args.keep) as root, ExitStack() as stack:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        if not env.get("PREFECT_API_URL"):
            from reliability_helpers import prefect_server

            api, server_env = stack.enter_context(prefect_server(Path(root)))
            env.update(server_env, PREFECT_API_URL=api)
        log(f"{args.calls} calls each against {env['PREFECT_API_URL']} "
            f"(load average {load_start})")
        dreg, yardstick = [], []
        for i in range(args.calls):
            uri = f"s3://landing/bench-emit/vol-{i:03d}.ome.zarr"
            dreg.append(timed([str(BIN / "dreg"), "emit-ingested", uri, "--version", "v1"],
                              env))
            yardstick.append(timed([sys.executable, "-c", YARDSTICK, uri + "-yardstick"],
                                   env))

    def mean(rows: list[tuple[float, float]], column: int) -> float:
        return sum(row[column] for row in rows) / len(rows)

    emit({"calls": args.calls,
          "emit_cpu_s_per_call": round(mean(dreg, 0), 3),
          "emit_wall_s_per_call": round(mean(dreg, 1), 2),
          "yardstick_cpu_s_per_call": round(mean(yardstick, 0), 3),
          "yardstick_wall_s_per_call": round(mean(yardstick, 1), 2),
          "cpu_ratio": round(mean(yardstick, 0) / mean(dreg, 0), 1),
          "load_average": [load_start, load_average()]})


if __name__ == "__main__":
    main()
