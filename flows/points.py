"""Transform a point set between the fixed and moving spaces of a finished registration.

Prefect entrypoint: ``flows/points.py:transform_points_file``. `source="fixed"` applies
the field u (fixed → moving); `source="moving"` applies the inverse v (moving → fixed),
computing it first when OUT has no current inverse. Rows are cut into batches, one task
each; a batch reads the box of the field its points need once (tile by tile of field
chunks when that box is large), so every read touches only the chunks around its
points. Row order and extra columns are kept.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote
from prefect_dask import DaskTaskRunner

from dreg.apply.plan import PointsPlan, PointsResult, plan_points
from flows import artifacts
from flows.cluster import dask_cluster
from flows.invert import invert_field
from flows.options import RunOptions
from flows.run_names import points_run_name
from tasks.apply import prepare_points, transform_points, write_points


@flow(name="dreg-points-batches")
def write_transformed(plan: PointsPlan, retries: int) -> list[dict]:
    token = prepare_points(plan)
    task = transform_points.with_options(retries=retries)
    futures = [task.submit(plan, start, stop, i, token)
               for i, (start, stop) in enumerate(plan.batches)]
    # Written while the batches run, each part as soon as it and those before it are
    # done; quoted, so that Prefect hands the futures over instead of waiting for them.
    write_points(plan, len(futures), quote(futures))
    return [f.result() for f in futures]  # a failed batch fails the run


@flow(name="dreg-transform-points", flow_run_name=points_run_name)
def transform_points_file(out: str, points: str, dest: str, source: str,
                          options: RunOptions | None = None) -> PointsResult:
    """Write `dest`: the rows of `points` with x, y, z moved out of the `source` space."""
    started = time.perf_counter()
    options = options or RunOptions()
    plan = plan_points(out, points, dest, source)
    if plan.needs_inverse:
        get_run_logger().info("no current inverse in OUT: computing it first")
        invert_field(out, options)
    with dask_cluster(options.dask_address, options.workers, warm=False) as address:
        runner = DaskTaskRunner(address=address)
        counts = write_transformed.with_options(task_runner=runner)(
            plan, options.block_retries)
    result = PointsResult(output=plan.dest, points=plan.points, source=plan.source,
                          field=plan.field, rows=sum(c["rows"] for c in counts),
                          outside=sum(c["outside"] for c in counts), batches=len(counts),
                          seconds=round(time.perf_counter() - started, 3),
                          flow_run_id=str(flow_run.get_id()))
    artifacts.publish_output("points", plan.out, plan.dest, result.model_dump(mode="json"),
                             f"Points moved from the {plan.source} space")
    return result
