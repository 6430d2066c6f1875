"""The whole job at the size dreg exists for: a size^3 uint16 pair, end to end.

Makes a `dreg synth` pair (uint16, written chunk by chunk: nothing loads it whole), then
runs, as a user would, one command after the other on `--workers` local workers with
the built-in pipeline and the embedded defaults (Prefect's temporary API server):

    dreg register FIXED MOVING OUT --no-qc
    dreg warp OUT
    dreg invert OUT
    dreg transform-points OUT points.parquet moved.parquet --from fixed     (--points rows)
    dreg transform-points OUT moved.parquet back.parquet --from moving
    dreg qc OUT

For each step it records wall and CPU seconds (the command and every process under it:
Dask workers, the temporary Prefect server) and the peak RSS of every process, polled
every half second (`peak_rss_mb_by_role`), and of the largest one as the kernel counted
it (`max_process_rss_mb`). Then the error of the registration's field against the
truth, streamed chunk by chunk over every field voxel at least 2 voxels inside its
border (RMS exact, p95 from a histogram of 1e-3-voxel bins), the points' round trip
|back - points| over the rows moved both ways, and QC's verdict. Prints progress, then
one JSON line: `total_wall_s`, `max_process_rss_mb`, `rms_after`, `qc_status`, and the
issue's targets (`target_*`: the whole job within an hour, no process above 3 GiB, RMS
at most 0.25 voxel with QC ok).

    .venv/bin/python bench/gigavoxel.py [--size 1024] [--workers 2] [--points 10000000]
                                        [--dir DIR] [--keep] [--pair DIR]

`--size 256` gives the same run for a quick look (about ten minutes on 2 cores). `--pair`
takes a pair made before (`dreg synth DIR --shape S,S,S --dtype uint16`, with this
script's seed and amplitude) instead of making one: at 1024^3 that took half an hour
(beside a test suite), outside the job's time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, emit, load_average, log, work_folder  # noqa: E402
from points import write_points  # noqa: E402

POLL_S = 0.5
MARGIN = 2  # field voxels left out at each border when comparing with the truth
BIN = 1e-3  # voxel, the histogram's bin for the error's 95th percentile
HOUR_S = 3600.0
RSS_LIMIT_MB = 3 * 1024.0
RMS_TARGET = 0.25


def role(process) -> str:
    """A short name for a process of a step: the dreg command, a Dask worker or nanny,
    Prefect's temporary server."""
    import psutil

    try:
        words = process.cmdline()
    except psutil.Error:
        return "gone"
    text = " ".join(words)
    if "uvicorn" in text or "prefect.server" in text:
        return "prefect-server"
    if "multiprocessing" in text or "spawn_main" in text:
        return "dask-worker"
    if "cli.main" in text:
        index = words.index("cli.main")
        return "dreg " + (words[index + 1] if len(words) > index + 1 else "")
    if len(words) > 1 and words[1].endswith(".py"):
        return Path(words[1]).stem  # a script: bench/_itk_dreg_run.py is "_itk_dreg_run"
    return Path(words[0]).name if words else "?"


class TreeWatch:
    """Polls a process and its descendants for their RSS until stopped."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peaks: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                members = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                members = []
            for member in members:
                try:
                    rss = member.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                name, peak = self.peaks.get(member.pid, (None, 0.0))
                if name is None:
                    name = role(member)
                self.peaks[member.pid] = (name, max(peak, rss))
            self._stop.wait(POLL_S)

    def stop(self) -> dict[str, float]:
        """Peak RSS (MiB) by role: the largest process of each role."""
        self._stop.set()
        self._thread.join()
        by_role: dict[str, float] = {}
        for name, peak in self.peaks.values():
            by_role[name] = round(max(by_role.get(name, 0.0), peak), 1)
        return by_role


def run_step(name: str, args: list[str]) -> dict:
    """Run `dreg ARGS` in a child process; its figures and its last JSON line."""
    log(f"{name}: dreg {' '.join(args)}")
    return run_command(name, [sys.executable, "-m", "cli.main", *args])


def run_command(name: str, command: list[str]) -> dict:
    """Run `command` in a child process: its wall and CPU seconds (with every process
    under it), the peak RSS of each role of process, and its last JSON line."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = TreeWatch(process.pid)
    out, err = process.communicate()
    wall = time.perf_counter() - started
    peaks = watch.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise RuntimeError(f"{name} failed ({process.returncode}): {err.strip()[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    figures = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
               "peak_rss_mb_by_role": peaks,
               "load_average_after": load_average()}
    log(f"{name}: {figures['wall_s']} s wall, {figures['cpu_s']} CPU-s, peaks {peaks}")
    return {"figures": figures, "line": json.loads(lines[-1]) if lines else {}}


def field_error_streamed(field_uri: str, truth_uri: str) -> dict:
    """RMS, p95 and max of |u - u_true| in voxels of the truth's grid, chunk by chunk
    over the field's voxels at least MARGIN from its border, without keeping them."""
    import numpy as np

    from dreg.qc.accuracy import chunk_errors

    counts = np.zeros(int(20 / BIN) + 1, dtype=np.int64)  # the last bin: 20 voxels or more
    total = squares = squares_before = 0.0
    largest = 0.0
    for error, before in chunk_errors(field_uri, truth_uri, MARGIN):
        total += error.size
        squares += float(np.sum(error.astype(np.float64) ** 2))
        squares_before += float(np.sum(before.astype(np.float64) ** 2))
        largest = max(largest, float(error.max()))
        np.add.at(counts, np.minimum((error / BIN).astype(np.int64), counts.size - 1), 1)
    p95_bin = int(np.searchsorted(np.cumsum(counts), 0.95 * total))
    return {"rms_before": round(float(np.sqrt(squares_before / total)), 4),
            "rms_after": round(float(np.sqrt(squares / total)), 4),
            "p95_after": round((p95_bin + 1) * BIN, 3),
            "max_after": round(largest, 4), "voxels_compared": int(total)}


def round_trip(points: Path, back: Path) -> dict:
    """|back - points| (world units) over the rows moved both ways (not NaN), a million
    rows at a time (the commands keep the rows in their order)."""
    import numpy as np
    import pyarrow.parquet as pq

    columns = ["x", "y", "z"]
    batches = zip(pq.ParquetFile(points).iter_batches(1 << 20, columns=columns),
                  pq.ParquetFile(back).iter_batches(1 << 20, columns=columns), strict=True)
    squares, largest, rows, lost = 0.0, 0.0, 0, 0
    for a, b in batches:
        xyz_a = np.column_stack([a.column(c).to_numpy() for c in columns])
        xyz_b = np.column_stack([b.column(c).to_numpy(zero_copy_only=False) for c in columns])
        distance = np.linalg.norm(xyz_b - xyz_a, axis=1)
        kept = np.isfinite(distance)
        lost += int((~kept).sum())
        rows += int(kept.sum())
        squares += float(np.sum(distance[kept] ** 2))
        largest = max(largest, float(distance[kept].max()) if kept.any() else 0.0)
    return {"round_trip_rms": round(float(np.sqrt(squares / max(rows, 1))), 5),
            "round_trip_max": round(largest, 5), "rows_both_ways": rows,
            "rows_outside": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image edge, voxels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--points", type=int, default=10_000_000)
    parser.add_argument("--amplitude", type=float, default=2.0,
                        help="the synthetic deformation's peak per component, voxels")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--pair", default=None,
                        help="a folder with the fixed, moving and truth images of an earlier "
                             "`dreg synth` of this size, used instead of making the pair")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary work folder (no effect with --dir)")
    args = parser.parse_args()
    workers = ["--workers", str(args.workers)]

    with work_folder(args.dir, "dreg-bench-gigavoxel-", args.keep) as work:
        load_before = load_average()
        log(f"a {args.size}^3 uint16 pair, end to end in {work} (load average {load_before})")
        steps: dict[str, dict] = {}
        size = f"{args.size},{args.size},{args.size}"
        pair, out = work / "pair", work / "out"
        if args.pair:
            pair = Path(args.pair)
            log(f"the pair in {pair}, made before")
        else:
            synth = run_step("synth", ["synth", str(pair), "--shape", size, "--dtype",
                                       "uint16", "--seed", str(args.seed), "--amplitude",
                                       str(args.amplitude), "--workers", str(args.workers)])
            steps["synth"] = synth["figures"]
        fixed, moving, truth = (str(pair / f"{n}.ome.zarr") for n in ("fixed", "moving", "truth"))
        from dreg.io import ome_zarr

        grid = ome_zarr.open_image(fixed).levels[0].grid
        if grid.shape_zyx != (args.size,) * 3:
            raise SystemExit(f"{fixed}: {grid.shape_zyx} voxels, not --size {args.size}")
        job_started = time.perf_counter()
        register = run_step("register", ["register", fixed, moving, str(out), "--no-qc",
                                         *workers])
        steps["register"] = register["figures"]
        steps["warp"] = run_step("warp", ["warp", str(out), *workers])["figures"]
        steps["invert"] = run_step("invert", ["invert", str(out), *workers])["figures"]

        points, moved, back = work / "points.parquet", work / "moved.parquet", \
            work / "back.parquet"
        log(f"writing {args.points} points")
        write_points(points, grid, args.points, "parquet", args.seed)
        steps["points_fixed_to_moving"] = run_step("points fixed -> moving", [
            "transform-points", str(out), str(points), str(moved), "--from", "fixed",
            *workers])["figures"]
        steps["points_moving_to_fixed"] = run_step("points moving -> fixed", [
            "transform-points", str(out), str(moved), str(back), "--from", "moving",
            *workers])["figures"]
        qc = run_step("qc", ["qc", str(out), *workers])
        steps["qc"] = qc["figures"]
        job_wall = time.perf_counter() - job_started
        log("comparing the field with the truth")
        error = field_error_streamed(str(out / "field.ome.zarr"), truth)
        trip = round_trip(points, back)

    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB
    job_cpu = sum(s["cpu_s"] for name, s in steps.items() if name != "synth")
    qc_status = qc["line"].get("qc")
    log(f"job {job_wall:.0f} s wall, {job_cpu:.0f} CPU-s; largest process {largest:.0f} MiB; "
        f"RMS {error['rms_before']} -> {error['rms_after']} voxel; QC {qc_status}")
    emit({
        "size": args.size, "dtype": "uint16", "workers": args.workers,
        "points": args.points,
        "total_wall_s": round(job_wall, 1), "total_cpu_s": round(job_cpu, 1),
        "steps": steps,
        "blocks": register["line"].get("block_counts"),
        "max_process_rss_mb": round(largest, 1),
        **error, **trip,
        "qc_status": qc_status,
        "target_hour": job_wall <= HOUR_S,
        "target_rss": largest <= RSS_LIMIT_MB,
        "target_accuracy": error["rms_after"] <= RMS_TARGET and qc_status == "ok",
        "load_average": [load_before, load_average()],
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    })


if __name__ == "__main__":
    main()
