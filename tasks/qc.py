"""Prefect tasks of the QC flow: thin wrappers over `dreg.qc`, with retries.

Nothing is cached: QC reads the current field and images, and measuring again is the
honest answer to a retried or repeated run.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from dreg.grid import Region
from dreg.io import completion
from dreg.qc import check, measure
from dreg.qc.plan import QcPlan
from dreg.qc.report import Picture, QcReport
from dreg.registration import RegistrationResult

OPTIONS = {"retries": 2, "retry_delay_seconds": 1, "cache_policy": NO_CACHE}


@task(name="clear-qc", **OPTIONS)
def clear_qc(plan: QcPlan) -> None:
    check.clear(plan)


@task(name="measure-bricks", task_run_name="measure-bricks-{number}", **OPTIONS)
def measure_bricks(plan: QcPlan, bricks: list[Region], number: int) -> measure.BrickMeasure:
    """det J over a batch of bricks of the field (each with a one-voxel halo) and the
    similarity histograms of their lattice points, merged: one task run per batch."""
    return measure.measure_bricks(plan, bricks)


@task(name="stage-numbers", **OPTIONS)
def stage_numbers(plan: QcPlan) -> list[dict]:
    return check.stages_of(plan)


@task(name="draw-pictures", task_run_name="draw-{group}-pictures", **OPTIONS)
def draw_pictures(plan: QcPlan, group: str) -> list[Picture]:
    """One group of the pictures ("images" or "field"), as PNGs in OUT/qc/."""
    from dreg.qc import pictures  # matplotlib: imported by the workers that draw only

    return pictures.draw_pictures(plan, group)


@task(name="write-qc-report", **OPTIONS)
def write_report(report: QcReport) -> str:
    """qc.json and index.html; returns the page's location."""
    return check.write_report(report)


@task(name="record-qc-verdict", **OPTIONS)
def record_verdict(result: RegistrationResult, report: QcReport) -> RegistrationResult:
    """result.json again, now carrying the QC verdict: replaced in one piece, so that it
    never reads as anything but a whole finished result."""
    updated = result.model_copy(update={"qc": report.qc, "qc_reason": report.reason})
    completion.write_whole(updated.result, updated.document(), replace=True)
    return updated
