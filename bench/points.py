"""Points per second of moving a large point set through a finished registration's field,
against scipy.ndimage.map_coordinates moving the same points in memory.

Makes a `dreg synth` pair of size^3 (64^3 chunks, in a child process) and, without
registering, a finished registration output from it: the pair's exact field
(truth.ome.zarr) sampled on the grid a registration writes at `--field-factor` (default
2: the same extent, half the voxels per axis, 64^3 chunks of raw float32; 1 copies the
truth field itself) as OUT/field.ome.zarr, and OUT/result.json. Writes N points drawn
uniformly inside the fixed image's domain (world x, y, z and an extra int64 `id`
column) as Parquet (row groups of 131,072 rows) or CSV, written in slices of at most
1,048,576 rows so that this process never holds the whole set; then runs
flows.points.transform_points_file (fixed -> moving, batches of 1,000,000 rows, one task
each) on a LocalCluster of single-threaded workers (not warmed for elastix, which this
does not use; the task modules are imported and the compiled loops of the points step
loaded up front), writing the moved points in the same format. Prints progress, then one JSON line:

    points_per_s = rows / wall seconds of the transform_points_file flow
    yardstick_points_per_s = rows / seconds of the same points moved in memory on one
        thread: world -> index (NumPy), scipy.ndimage.map_coordinates (order 1, mode
        "nearest", one call per component) on the field array loaded whole, added to the
        points; no file I/O
    ratio = points_per_s / yardstick_points_per_s

The flow's wall time includes reading the input's footer (or counting a CSV's rows) and
concatenating the batches' parts into the output; batches_s is the span of the batch
tasks alone and write_s the concatenation task's, from the Prefect API (null when the
API could not tell).
`max_abs_diff_vs_yardstick` compares the flow's output with the yardstick's points.

    .venv/bin/python bench/points.py [--size 256] [--points 10000000]
                                     [--format parquet|csv] [--workers 2]
                                     [--field-factor 2] [--keep]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    APPLY_TASK_MODULES,
    emit,
    finished_registration,
    in_flow_with_cluster,
    load_average,
    log,
    make_pair,
    peak_rss_mb,
    task_run_spans,
    work_folder,
    worker_peak_rss_mb,
)

WRITE_ROWS = 1 << 20
"""Rows generated and written at once."""
ROW_GROUP_ROWS = 1 << 17
"""Rows per Parquet row group (as the flow's own parts use)."""


def write_points(uri: Path, grid, count: int, fmt: str, seed: int) -> int:
    """`count` points uniform inside `grid` (continuous indices 0..n-1 on each axis),
    columns id, x, y, z, written WRITE_ROWS at a time. Returns the file's bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    upper = np.asarray(grid.shape_zyx, dtype=float) - 1
    schema = pa.schema([("id", pa.int64()), ("x", pa.float64()), ("y", pa.float64()),
                        ("z", pa.float64())])
    if fmt == "parquet":
        writer = pq.ParquetWriter(uri, schema)
    else:
        writer = pacsv.CSVWriter(uri, schema)
    with writer:
        for start in range(0, count, WRITE_ROWS):
            stop = min(start + WRITE_ROWS, count)
            world = grid.index_to_world(rng.uniform(0.0, 1.0, (stop - start, 3)) * upper)
            table = pa.table({"id": np.arange(start, stop, dtype=np.int64),
                              "x": world[:, 0], "y": world[:, 1], "z": world[:, 2]},
                             schema=schema)
            if fmt == "parquet":
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            else:
                writer.write_table(table)
    return uri.stat().st_size


def read_xyz(uri: Path, fmt: str):
    """The x, y, z columns of a points file as float64 (N, 3)."""
    import numpy as np
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        table = pq.read_table(uri, columns=["x", "y", "z"])
    else:
        table = pacsv.read_csv(uri).select(["x", "y", "z"])
    return np.stack([table.column(n).to_numpy() for n in ("x", "y", "z")], axis=1)


def yardstick(field_uri: str, points) -> tuple[float, object]:
    """Seconds to move `points` (N, 3) through the field in memory on one thread with
    scipy.ndimage.map_coordinates (order 1, one call per component, the field loaded
    whole beforehand), and the moved points."""
    import numpy as np
    from scipy import ndimage
    from threadpoolctl import threadpool_limits

    from dreg.field import open_field
    from dreg.grid import whole_region
    from dreg.io import ome_zarr

    field = open_field(field_uri)
    grid = field.levels[0].grid
    data = ome_zarr.read_region(field, 0, whole_region(grid.shape_zyx))  # (3, z, y, x)
    with threadpool_limits(limits=1):  # world_to_index's matrix product, on one thread
        started = time.perf_counter()
        index = np.ascontiguousarray(grid.world_to_index(points).T)  # (3, N) rows z, y, x
        components = [ndimage.map_coordinates(data[c], index, order=1, mode="nearest")
                      for c in range(3)]  # float32, components z, y, x
        moved = points + np.stack(components[::-1], axis=1)
        seconds = time.perf_counter() - started
    return seconds, moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image edge, voxels")
    parser.add_argument("--points", type=int, default=10_000_000, help="number of points")
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet",
                        help="points file format, input and output")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--field-factor", type=int, default=2,
                        help="spacing factor of the field's grid (a registration's default "
                             "is 2; 1 uses the truth field as it is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary work folder (no effect with --dir)")
    args = parser.parse_args()

    with work_folder(args.dir, "dreg-bench-points-", args.keep) as work:
        load_before = load_average()
        log(f"making a {args.size}^3 pair in {work} (load average {load_before})")
        started = time.perf_counter()
        pair = make_pair(work / "pair", args.size, workers=args.workers)
        out = finished_registration(pair, work / "out", factor=args.field_factor)
        log(f"pair and finished output ready in {time.perf_counter() - started:.1f} s")

        from dreg.io import ome_zarr

        source = work / f"points.{args.format}"
        dest = work / f"points-moving.{args.format}"
        dest.unlink(missing_ok=True)
        log(f"writing {args.points:,} points ({args.format}) to {source}")
        started = time.perf_counter()
        size = write_points(source, ome_zarr.open_image(pair["fixed"]).levels[0].grid,
                            args.points, args.format, args.seed)
        log(f"{size / 1e6:.1f} MB written in {time.perf_counter() - started:.1f} s")

        def body(cluster) -> dict:
            from flows.options import RunOptions
            from flows.points import transform_points_file

            address = cluster.scheduler_address
            # Each worker loads the compiled loops once (about a second), as registration
            # workers load the reduce's when warmed: not a cost per point.
            from distributed import Client

            from dreg.apply import points

            with Client(address) as client:
                client.run(points.warm_up)
            log(f"moving the points fixed -> moving on {args.workers} worker(s)")
            started = time.perf_counter()
            result = transform_points_file(out, str(source), str(dest), "fixed",
                                           options=RunOptions(dask_address=address))
            wall = time.perf_counter() - started
            spans = task_run_spans(result.flow_run_id, {"transform-points": result.batches,
                                                        "write-points": 1})
            return {"result": result, "wall": wall, "spans": spans,
                    "workers": worker_peak_rss_mb(address)}

        run = in_flow_with_cluster(args.workers, body, name="dreg-bench-points", warm=False,
                                   modules=APPLY_TASK_MODULES)
        output_mb = round(dest.stat().st_size / 1e6, 1)

        import numpy as np

        log("the yardstick: the same points through map_coordinates on one thread")
        points = read_xyz(source, args.format)
        yardstick_s, expected = yardstick(str(Path(out) / "field.ome.zarr"), points)
        del points
        difference = float(np.max(np.abs(read_xyz(dest, args.format) - expected),
                                  initial=0.0))
        del expected

    result, wall, spans = run["result"], run["wall"], run["spans"]
    rate = result.rows / wall
    yardstick_rate = result.rows / yardstick_s if yardstick_s > 0 else 0.0
    log(f"{result.rows:,} rows in {result.batches} batches: {wall:.2f} s, "
        f"{rate / 1e6:.3f} million points per second; {result.outside} outside the field; "
        f"yardstick {yardstick_rate / 1e6:.3f} million points per second")
    batches = spans["transform-points"] if spans else None
    concatenation = spans["write-points"] if spans else None
    emit({
        "size": args.size, "workers": args.workers, "format": args.format,
        "field_factor": args.field_factor,
        "rows": result.rows,
        "outside": result.outside,
        "batches": result.batches,
        "points_s": round(wall, 3),
        "flow_s": result.seconds,
        "points_per_s": round(rate),
        "yardstick_points_per_s": round(yardstick_rate),
        "yardstick_s": round(yardstick_s, 3),
        "ratio": round(rate / yardstick_rate, 3) if yardstick_rate else None,
        "max_abs_diff_vs_yardstick": difference,
        "batches_s": batches["s"] if batches else None,
        "batch_task_s_mean": round(batches["task_s"] / result.batches, 3) if batches else None,
        "write_s": concatenation["task_s"] if concatenation else None,
        "input_mb": round(size / 1e6, 1),
        "output_mb": output_mb,
        "flow_peak_rss_mb": round(peak_rss_mb(), 1),
        "worker_peak_rss_mb": run["workers"],
        "load_average": [load_before, load_average()],
        "measured": time.strftime("%Y-%m-%d %H:%M"),
    })


if __name__ == "__main__":
    main()
