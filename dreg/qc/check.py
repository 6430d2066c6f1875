"""The QC steps as plain functions, and all of them in one process (for tests, scripts
and small outputs; the QC flow runs the same steps as tasks on Dask).

Steps: clear OUT/qc/, measure every brick of the field, read the stage tables, draw the
pictures, then write qc.json and index.html (the page last).
"""

from __future__ import annotations

import time

from dreg.io import locations, storage
from dreg.layout import QC_FILE
from dreg.qc.measure import BrickMeasure, measure_bricks
from dreg.qc.page import render_page
from dreg.qc.plan import QcPlan, brick_regions
from dreg.qc.report import QcReport, build_report
from dreg.qc.stages import read_table, stage_numbers
from dreg.qc.viewer_record import running_viewer_url


def clear(plan: QcPlan) -> None:
    """Remove an earlier QC of OUT: nothing stale stays next to the new pictures."""
    storage.remove_tree(plan.folder)


def measure_field(plan: QcPlan) -> BrickMeasure:
    """Every brick of the field, one after the other, merged."""
    return measure_bricks(plan, brick_regions(plan))


def stages_of(plan: QcPlan) -> list[dict]:
    """Every stage's blocks by status and metric gain, from its block table."""
    return [stage_numbers(stage, read_table(stage)) for stage in plan.stages]


def write_report(report: QcReport) -> str:
    """qc.json, then index.html (the pictures embedded, and a link to a viewer of OUT
    that runs on this machine now); returns the page's location."""
    storage.write_text(storage.join(report.folder, QC_FILE), report.document())
    pngs = {p.name: storage.read_bytes(p.uri) for p in report.pictures}
    storage.write_text(report.page, render_page(report, pngs,
                                                running_viewer_url(report.output)))
    return report.page


def check(plan: QcPlan, flow_run_id: str | None = None) -> QcReport:
    """The whole QC in this process: numbers, pictures, qc.json and index.html."""
    from dreg.qc.pictures import draw_pictures  # matplotlib: only where pictures are drawn

    started = time.perf_counter()
    clear(plan)
    measure = measure_field(plan)
    pictures = draw_pictures(plan)
    report = build_report(plan, measure, stages_of(plan), pictures,
                          time.perf_counter() - started, flow_run_id)
    write_report(report)
    return report


def load_report(folder: str) -> QcReport:
    """The QC report in OUT/qc/, its locations inside OUT resolved against the OUT that
    holds `folder` (a copied or moved OUT is itself)."""
    recorded = QcReport.model_validate_json(storage.read_text(storage.join(folder, QC_FILE)))
    out = storage.normalize_uri(folder).rsplit("/", 1)[0]
    return recorded.relocated(
        lambda path: locations.resolve(path, out, recorded.output)).model_copy(
        update={"output": out})
