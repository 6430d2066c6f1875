"""The QC report (OUT/qc/qc.json) and its verdict.

A registration passes ("ok") unless the field folds in more than a threshold share of
its voxels (det J <= 0), or the images got less alike than before registration, or the
similarity could not be measured at all; then it is "warn", with the reason. A warning
never fails the run: the field is still written, and the reason travels in the run's
summary, result.json and completion event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from dreg.io import locations
from dreg.qc.measure import BrickMeasure
from dreg.qc.plan import QcPlan
from dreg.qc.similarity import similarity_summary

OK = "ok"
WARN = "warn"
PICTURE_GROUPS = ("images", "field")  # drawn by separate tasks (dreg.qc.pictures)


class Picture(BaseModel):
    """One PNG of OUT/qc/."""

    name: str
    uri: str
    title: str
    caption: str = ""
    width: int
    height: int


class QcReport(BaseModel):
    """What qc.json holds and the QC flow returns. In qc.json, what lies inside OUT is
    named relative to OUT (`load_report` resolves it), as in result.json."""

    output: str
    field: str
    folder: str
    page: str
    qc: Literal["ok", "warn"]
    reason: str = ""
    fold_threshold: float
    jacobian: dict
    fold_chunks: list[dict] = Field(default_factory=list,
                                    description="the field chunks with the most folds")
    similarity: dict
    stages: list[dict]
    pictures: list[Picture]
    centre_xyz: list[float]
    warped: str | None = None
    seconds: float = 0.0
    flow_run_id: str | None = None

    def relocated(self, move: Callable[[str], str]) -> QcReport:
        """This report with every location inside OUT passed through `move`."""
        return self.model_copy(update={
            "field": move(self.field), "folder": move(self.folder), "page": move(self.page),
            "warped": move(self.warped) if self.warped else None,
            "pictures": [p.model_copy(update={"uri": move(p.uri)}) for p in self.pictures]})

    def document(self) -> str:
        """The JSON text of qc.json: what lies inside OUT named relative to OUT."""
        return self.relocated(lambda uri: locations.inside(uri, self.output)).model_dump_json(
            indent=2)


def verdict(jacobian: dict, similarity: dict, fold_threshold: float) -> tuple[str, str]:
    """("ok", "") or ("warn", the reasons): folds above the threshold, a field that is
    not finite somewhere, a similarity that got worse or could not be measured."""
    reasons = []
    if jacobian.get("nonfinite"):
        reasons.append(f"the field is not a number at {jacobian['nonfinite']} of its "
                       f"{jacobian['voxels']} voxels (det J cannot be computed there)")
    share = jacobian.get("share_nonpositive") or 0.0
    if share > fold_threshold:
        reasons.append(f"the field folds: det J <= 0 in {share:.3%} of its voxels "
                       f"({jacobian['nonpositive']} of {jacobian['voxels']}; threshold "
                       f"{fold_threshold:.3%})")
    before, after = similarity.get("before"), similarity.get("after")
    if before is None or after is None:
        reasons.append("the similarity could not be measured: no lattice point maps "
                       "inside the moving image")
    elif after < before:
        reasons.append(f"the similarity got worse: {similarity['metric']} {before:.4f} "
                       f"before, {after:.4f} after")
    return (WARN, "; ".join(reasons)) if reasons else (OK, "")


def build_report(plan: QcPlan, measure: BrickMeasure, stages: list[dict],
                 pictures: list[Picture], seconds: float,
                 flow_run_id: str | None) -> QcReport:
    """The report from the merged brick measures, the stage numbers and the pictures."""
    jacobian = measure.jacobian.summary()
    bins = (plan.bins, plan.bins)
    before = measure.before if measure.before is not None else np.zeros(bins, np.int64)
    after = measure.after if measure.after is not None else np.zeros(bins, np.int64)
    similarity = similarity_summary(before, after, plan)
    qc, reason = verdict(jacobian, similarity, plan.fold_threshold)
    return QcReport(
        output=plan.out, field=plan.field, folder=plan.folder, page=plan.page_uri, qc=qc,
        reason=reason, fold_threshold=plan.fold_threshold, jacobian=jacobian,
        fold_chunks=measure.fold_chunks, similarity=similarity, stages=stages,
        pictures=pictures, centre_xyz=list(plan.centre_xyz), warped=plan.warped,
        seconds=round(seconds, 3), flow_run_id=flow_run_id)


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def summary_rows(report: QcReport) -> list[dict[str, str]]:
    """The report's numbers as (measure, value) rows: the HTML page's table and the
    Prefect table artifact."""
    j, s = report.jacobian, report.similarity
    rows = [
        ("verdict", report.qc + (f": {report.reason}" if report.reason else "")),
        ("det J minimum", _number(j.get("min"))),
        ("det J 1st percentile", _number(j.get("p01"))),
        ("det J maximum", _number(j.get("max"))),
        ("share of voxels with det J ≤ 0",
         f"{j.get('share_nonpositive', 0.0):.4%} ({j.get('nonpositive', 0)} voxels; "
         f"warn above {report.fold_threshold:.3%})"),
        ("field voxels", _number(j.get("voxels"))),
        (f"similarity before ({s.get('metric')})", _number(s.get("before"))),
        (f"similarity after ({s.get('metric')})", _number(s.get("after"))),
        ("similarity measured on", f"{s.get('points')} points (field voxels at stride "
         f"{s.get('lattice_stride')})"),
        ("similarity levels read", f"fixed {s.get('fixed_level')}, moving "
         f"{s.get('moving_level')}"),
        ("similarity after from", f"the {s.get('after_from')}"),
    ]
    for stage in report.stages:
        name = f"stage {stage['number']}-{stage['name']}"
        counts = ", ".join(f"{status} {n}" for status, n in stage["counts"].items() if n)
        rows.append((f"{name}: blocks", f"{stage['blocks']} ({counts or 'none'})"))
        gain = stage.get("metric_gain")
        if gain:
            rows.append((f"{name}: metric gain", (
                f"median {_number(gain['p50'], 3)} (p5 {_number(gain['p05'], 3)}, p95 "
                f"{_number(gain['p95'], 3)}); {gain['improved_share']:.0%} of "
                f"{gain['blocks']} improved")))
    rows.append(("QC folder", report.folder))
    return [{"measure": m, "value": v} for m, v in rows]
