"""Every benchmark script runs at a tiny size and prints its figures as one JSON line,
last on stdout, with its headline keys (so the scripts never rot). No timings are
asserted: the figures only have to be there and be numbers. The JSON line is the last
line of stdout and stderr together: nothing (Prefect's exit, a worker) writes after it.
The scripts that run flows report to the session's Prefect API (the test harness's
server), not a temporary one each, except one, which runs on its own temporary API,
whose stop at exit used to log after the figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import prefect_db
import pytest

REPO = Path(__file__).resolve().parents[1]

# script: (tiny arguments, headline keys, whether it runs flows)
CASES = {
    "block": (["--size", "32", "--iterations", "4"],
              ["cpu_s_preset", "rms_preset", "cpu_s_elastix_default", "cpu_ratio"], False),
    "reduce": (["--blocks", "8", "--block", "32", "--chunk", "16", "--workers", "1"],
               ["field_voxels_per_s"], False),
    "overhead": (["--size", "32", "--block", "16", "--iterations", "2", "--workers", "1"],
                 ["overhead_s_per_block"], True),
    "scaling": (["--size", "48", "--block", "24", "--iterations", "2"],
                ["parallel_efficiency"], True),
    "memory": (["--sizes", "32", "--block", "16", "--iterations", "2", "--workers", "1"],
               ["worker_peak_rss_mb_32", "flow_peak_rss_mb"], True),
    "accuracy": (["--cases", "synth128", "--size", "48", "--iterations", "4", "--workers", "1"],
                 ["worst_rms_ratio", "worst_folded_share_dreg"], True),
    "warp": (["--size", "32", "--workers", "1"],
             ["warp_voxels_per_s", "warp_s", "voxels", "chunks", "batches",
              "yardstick_voxels_per_s", "ratio"], True),
    "invert": (["--size", "32", "--workers", "1"],
               ["invert_voxels_per_s", "invert_s", "voxels", "batches", "round_trip_max",
                "round_trip_p99", "yardstick_voxels_per_s", "yardstick_round_trip_max",
                "ratio"], True),
    "points": (["--size", "32", "--points", "20000", "--workers", "1"],
               ["points_per_s", "points_s", "rows", "outside", "batches"], True),
    "jacobian": (["--size", "32", "--chunk", "16", "--workers", "1"],
                 ["jacobian_voxels_per_s", "jacobian_voxels_per_cpu_s",
                  "compute_only_voxels_per_s"], False),
    "registration": (["--size", "24", "--block", "24", "--iterations", "2", "--workers", "1"],
                     ["wall_s", "reduce_field_voxels_per_s", "rms_after"], True),
    "rerun": (["--size", "32", "--quick", "--workers", "1"], ["rerun_ratio", "rerun_s"], True),
    "read_region": (["--size", "32", "--repeats", "1"], ["local_mb_per_s", "s3_mb_per_s"],
                    False),
    "peer": (["--size", "48", "--block", "24", "--iterations", "2", "--workers", "1",
              "--repeats", "1"], ["wall_s", "cpu_s", "largest_process_mb", "rms_after"], True),
    "emit": (["--calls", "1"],
             ["emit_cpu_s_per_call", "yardstick_cpu_s_per_call", "cpu_ratio"], True),
    "gigavoxel": (["--size", "32", "--points", "2000", "--workers", "1"],
                  ["total_wall_s", "total_cpu_s", "max_process_rss_mb", "rms_after",
                   "round_trip_max"], True),
}


# One script runs on a temporary API of its own (no PREFECT_API_URL) and a cluster of
# its own, as a user's first run does: warp, whose workers need no elastix (whose first
# load costs about 11 CPU-s per process).
ON_ITS_OWN_API = "warp"
# Scripts that run on the session's Dask cluster (DREG_DASK_ADDRESS, as on a platform
# with a cluster of its own): no cluster to start, elastix already loaded. The others
# start their own: warp (above) and scaling (it resizes its cluster).
ON_THE_SESSION_CLUSTER = {"rerun", "accuracy", "registration", "memory", "overhead",
                          "invert", "points", "gigavoxel", "peer"}


# Scripts that each start a whole platform (PostgreSQL, a Prefect server, a worker, a Dask
# cluster): tests/test_operations.py runs their code (tests/load_platform.py) on one platform,
# so that the suite starts it once; each script only parses its arguments and prints.
RUN_BY_TEST_OPERATIONS = {"burst", "soak"}


def test_every_script_has_a_case():
    scripts = {p.stem for p in (REPO / "bench").glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(CASES) | RUN_BY_TEST_OPERATIONS


@pytest.mark.parametrize("name", sorted(RUN_BY_TEST_OPERATIONS))
def test_platform_scripts_load_and_describe_their_arguments(name):
    done = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--size" in done.stdout and "--dir" in done.stdout


def run_script(name: str, args: list[str], env: dict) -> dict:
    """Run a script with stderr into the same pipe as stdout, in the order written: the
    last line of both must be the figures."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines, "no output"
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise AssertionError(f"the last line is not the figures: {lines[-3:]}") from None


@pytest.mark.parametrize("name", list(CASES))
def test_script_prints_its_figures_last(name, tmp_path, request):
    args, keys, runs_flows = CASES[name]
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if name == ON_ITS_OWN_API:
        env["PREFECT_HOME"] = str(prefect_db.seeded_home(tmp_path / "home"))
    elif runs_flows:
        env["PREFECT_API_URL"] = request.getfixturevalue("prefect_api")
    if name in ON_THE_SESSION_CLUSTER:
        env["DREG_DASK_ADDRESS"] = request.getfixturevalue("dask_address")
    figures = run_script(name, [*args, "--dir", str(tmp_path / "work")], env)
    for key in keys:
        value = figures[key]
        assert isinstance(value, int | float) and math.isfinite(value), (key, value)
    if name == "accuracy":
        # Both registrations improve on no registration at all, and QC gave its verdict.
        for case in figures["cases"].values():
            assert case["rms_dreg"] < case["rms_before"]
            assert case["rms_elastix"] < case["rms_before"]
            assert case["qc"] in ("ok", "warn")
    if name == "gigavoxel":
        # The job ran end to end: the registration helped, QC gave its verdict, and
        # points came back to where they started.
        assert figures["rms_after"] < figures["rms_before"]
        assert figures["qc_status"] in ("ok", "warn")
        assert figures["rows_both_ways"] > 0 and figures["round_trip_max"] < 0.5
    if name == "peer":
        # dreg's side of the comparison registered, with QC, in itk-dreg's configuration.
        assert figures["rms_after"] < figures["rms_before"]
        assert figures["qc"] and set(figures["qc"]) <= {"ok", "warn"}
    if name == "points":
        # Every point was drawn inside the field's grid.
        assert figures["rows"] == 20_000 and figures["outside"] == 0
    if name == ON_ITS_OWN_API:
        # Prefect started a temporary API server for the flows and stopped it at exit,
        # with a log line: the script stops it before printing its figures, which are
        # still the last line.
        assert figures["prefect_api"] == "temporary"

