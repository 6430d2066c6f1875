"""Quality control of a registration: numbers and pictures a person can judge it by.

Prefect entrypoint: ``flows/qc.py:quality_control`` (``dreg qc OUT``). It also runs at
the end of every registration (``register_images``), inside that run's ownership of OUT
and before result.json is written, so that result.json, the summary and the completion
event carry its verdict.

On Dask: the bricks of the field in batches, one task each (det J with a one-voxel halo,
and the similarity histograms of the bricks' lattice points), one task per group of
pictures, one that reads the stage tables; then qc.json and index.html.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from dreg.errors import first_line
from dreg.io.batches import region_batches
from dreg.qc.measure import BrickMeasure
from dreg.qc.plan import FOLD_THRESHOLD, QcPlan, brick_regions, plan_qc
from dreg.qc.report import PICTURE_GROUPS, QcReport, build_report
from dreg.registration import RegistrationResult
from dreg.registration.records import load_result
from flows import artifacts
from flows.cluster import dask_cluster, worker_count
from flows.events import INTERRUPT_MARKERS
from flows.options import RunOptions
from flows.ownership import owning
from flows.run_names import qc_run_name
from tasks.qc import (
    clear_qc,
    draw_pictures,
    measure_bricks,
    record_verdict,
    stage_numbers,
    write_report,
)


@flow(name="dreg-qc-measure", flow_run_name="qc-measure")
def measure_quality(plan: QcPlan, retries: int = 2, run_id: str | None = None,
                    workers: int = 1) -> QcReport:
    """Measure every brick (in batches, about two per worker of `workers`), draw the
    pictures, and write qc.json and index.html. The report names `run_id`, the flow run
    whose artifacts show it (default this one)."""
    started = time.perf_counter()
    clear_qc(plan)
    pictures = [draw_pictures.with_options(retries=retries).submit(plan, group)
                for group in PICTURE_GROUPS]
    stages = stage_numbers.with_options(retries=retries).submit(plan)
    bricks = brick_regions(plan)
    futures = [measure_bricks.with_options(retries=retries).submit(
        plan, [bricks[i] for i in batch], number)
        for number, batch in enumerate(region_batches(bricks, workers))]
    total = BrickMeasure()
    for future in as_completed(futures):
        total = total.merge(future.result())  # a brick that fails after retries fails QC
    drawn = [picture for future in pictures for picture in future.result()]
    report = build_report(plan, total, stages.result(), drawn, time.perf_counter() - started,
                          run_id or str(flow_run.get_id()))
    write_report.submit(report).result()
    get_run_logger().info(f"QC {report.qc}{': ' + report.reason if report.reason else ''}; "
                          f"{report.page}")
    return report


def run_quality_control(result: RegistrationResult, options: RunOptions,
                        fold_threshold: float = FOLD_THRESHOLD) -> QcReport:
    """QC of `result` on a Dask cluster (the given one, or a local one without the
    elastix warm-up, which QC does not need), reported as this flow run's."""
    plan = plan_qc(result, fold_threshold)
    with dask_cluster(options.dask_address, options.workers, warm=False) as address:
        return measure_quality.with_options(task_runner=DaskTaskRunner(address=address))(
            plan, options.block_retries, str(flow_run.get_id()), worker_count(address))


def check_registration(result: RegistrationResult, options: RunOptions) -> RegistrationResult:
    """The registration's result carrying the QC verdict. A QC that cannot finish does
    not sink the registration (its field is sound): the result then warns, saying why."""
    try:
        report = run_quality_control(result, options)
    except Exception as exc:  # noqa: BLE001 - reported in the result, never silent
        if any(marker in str(exc) for marker in INTERRUPT_MARKERS):
            raise
        get_run_logger().warning(f"quality control did not finish: {first_line(exc)}",
                                 exc_info=True)
        return result.model_copy(update={
            "qc": "warn", "qc_reason": f"quality control did not finish: {first_line(exc)}"})
    return result.model_copy(update={"qc": report.qc, "qc_reason": report.reason})


@flow(name="dreg-qc", flow_run_name=qc_run_name)
def quality_control(out: str, fold_threshold: float = FOLD_THRESHOLD,
                    options: RunOptions | None = None) -> QcReport:
    """Check the finished registration in `out`: write OUT/qc/ (qc.json, index.html,
    the pictures) and record the verdict in result.json."""
    options = options or RunOptions()
    result = load_result(out)
    with owning(result.output) as lease:
        report = run_quality_control(result, options, fold_threshold)
        # never rewrite the completion mark of an output another run owns
        lease.verify("recording the verdict")
        record_verdict(result, report)
    artifacts.publish_qc(report)
    return report
