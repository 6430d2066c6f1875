"""Artifacts a registration leaves in Prefect: made by the flows, so that a fully
cached re-run has them too."""

from __future__ import annotations

import hashlib
import re
import sys
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from dreg.io import storage
from dreg.layout import QC_FILE
from dreg.qc.check import load_report
from dreg.qc.page import data_uri, viewer_command
from dreg.qc.plan import qc_folder
from dreg.qc.report import QcReport, summary_rows
from dreg.registration import STATUSES, RegistrationResult, StageSummary


def artifact_key(kind: str, out_uri: str) -> str:
    """A stable artifact key for one kind of output of a location: readable, and unique
    by a hash."""
    slug = re.sub(r"[^a-z0-9]+", "-", out_uri.lower()).strip("-")[-40:].strip("-")
    digest = hashlib.sha256(out_uri.encode()).hexdigest()[:8]
    return f"dreg-{kind}-{slug}-{digest}"


def field_artifact_key(out_uri: str) -> str:
    return artifact_key("field", out_uri)


def field_link(uri: str) -> str:
    return uri if storage.is_s3(uri) else f"file://{uri}"


def publish_field_link(out_uri: str, field_uri: str) -> None:
    create_link_artifact(
        key=field_artifact_key(out_uri),
        link=field_link(field_uri),
        link_text="displacement field (fixed to moving)",
        description=f"Final displacement field of the registration into {out_uri}",
    )


def publish_status_table(stages: list[StageSummary]) -> None:
    rows = [
        {"stage": s.name, **{status: s.counts.get(status, 0) for status in STATUSES},
         "seconds": s.seconds}
        for s in stages
    ]
    create_table_artifact(table=rows, key="dreg-block-status",
                          description="Blocks by status, per stage")


def summary_markdown(result: RegistrationResult) -> str:
    """The registration's summary: inputs, outputs, blocks by status per stage, and the
    blocks that did not succeed."""
    lines = [
        "# Registration",
        f"- fixed: `{result.fixed}`",
        f"- moving: `{result.moving}`",
        f"- output: `{result.output}`",
        f"- field: `{result.field}`",
        f"- seconds: {result.seconds:.1f}",
        f"- failed blocks: {result.failed_blocks} ({result.failed_share:.1%} of all blocks)",
        f"- quality control: {result.qc or 'not run'}"
        + (f" ({result.qc_reason})" if result.qc_reason else ""),
        "",
        "| stage | level | transform | blocks | " + " | ".join(STATUSES) + " | seconds |",
        "|---|---|---|---|" + "---|" * len(STATUSES) + "---|",
    ]
    for s in result.stages:
        counts = " | ".join(str(s.counts.get(status, 0)) for status in STATUSES)
        lines.append(f"| {s.name} | {s.level} | {s.transform} | {s.blocks} | "
                     f"{counts} | {s.seconds:.1f} |")
    failures = [(s.name, f) for s in result.stages for f in s.failures]
    if failures:
        lines += ["", "## Blocks that did not succeed"]
        lines += [f"- {name} block {f['index']}: {f['status']}: {f['reason']}"
                  for name, f in failures[:50]]
    return "\n".join(lines)


def publish_result(result: RegistrationResult) -> None:
    """Every artifact of a finished registration: the field link, the status table and
    the summary. Made by the flow, so a fully cached re-run has them too."""
    publish_field_link(result.output, result.field)
    publish_status_table(result.stages)
    create_markdown_artifact(markdown=summary_markdown(result), key="dreg-summary",
                             description="Registration summary")
    if result.qc and storage.exists(storage.join(qc_folder(result.output), QC_FILE)):
        publish_qc(load_report(qc_folder(result.output)))


def qc_markdown(report: QcReport, pngs: dict[str, bytes]) -> str:
    """The QC as one markdown page: verdict, numbers, and every picture embedded as a
    data: URI (the Prefect UI renders them offline; a file on S3 would need a URL the
    browser can reach)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"# Quality control: {report.qc}"]
    if report.reason:
        lines += ["", f"**{report.reason}**"]
    lines += ["", f"Pictures and numbers also in `{report.page}` (one page, opens offline).",
              "", f"Fixed, warped and det J in 3D in a web viewer (Neuroglancer): run "
              f"`{viewer_command(report.output)}` and open the URL it prints.",
              "", "| measure | value |", "|---|---|"]
    lines += [f"| {cell(r['measure'])} | {cell(r['value'])} |" for r in summary_rows(report)]
    for picture in report.pictures:
        lines += ["", f"## {picture.title}", "", picture.caption, "",
                  f"![{picture.title}]({data_uri(pngs[picture.name])})"]
    return "\n".join(lines)


def publish_qc(report: QcReport) -> None:
    """QC artifacts of the current flow run: a link to OUT/qc/index.html, the numbers as
    a table, and the pictures in a markdown artifact."""
    create_link_artifact(key=artifact_key("qc", report.output), link=field_link(report.page),
                         link_text="quality control: pictures and numbers (index.html)",
                         description=f"Quality control of {report.output}: {report.folder}")
    create_table_artifact(table=summary_rows(report), key="dreg-qc-numbers",
                          description=f"Quality control numbers ({report.qc})")
    pngs = {p.name: storage.read_bytes(p.uri) for p in report.pictures}
    create_markdown_artifact(markdown=qc_markdown(report, pngs), key="dreg-qc",
                             description=f"Quality control pictures ({report.qc})")


def publish_output(kind: str, out_uri: str, uri: str, summary: dict,
                   description: str) -> None:
    """A link artifact to what a flow wrote, and its summary as a markdown table."""
    create_link_artifact(key=artifact_key(kind, out_uri), link=field_link(uri),
                         link_text=description, description=f"{description}: {uri}")
    rows = "\n".join(f"| {name} | `{value}` |" for name, value in summary.items())
    create_markdown_artifact(markdown=f"# {description}\n\n| | |\n|---|---|\n{rows}",
                             key=f"dreg-{kind}-summary", description=description)


class Progress:
    """Block progress: a Prefect progress artifact, and a bar on stderr if asked."""

    def __init__(self, total: int, label: str, show_bar: bool = False,
                 key: str | None = None) -> None:
        self.total, self.done, self.label, self.show_bar = total, 0, label, show_bar
        self.artifact_id: UUID = create_progress_artifact(
            progress=0.0, key=key, description=f"{label}: blocks registered"
        )
        self._last_reported = -1.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        percent = 100.0 * self.done / max(self.total, 1)
        # Report at most every 2 %, so thousands of blocks do not flood the API.
        if percent - self._last_reported >= 2.0 or self.done == self.total:
            update_progress_artifact(self.artifact_id, progress=percent)
            self._last_reported = percent
        if self.show_bar:
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r{self.label}: [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{self.done}/{self.total} blocks")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
