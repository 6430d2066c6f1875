"""The typed records of a registration run: its options, each stage's summary, and the
result that result.json holds and the flow returns.

Flows fill these from what their tasks return; nothing else builds these documents.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter
from collections.abc import Callable, Sequence

from pydantic import BaseModel, Field, computed_field

from dreg.errors import InputError, RunFailed, first_line
from dreg.io import completion, locations, ome_zarr, storage
from dreg.layout import RESULT_FILE
from dreg.registration.outcome import FAILED, OK, BlockResult
from dreg.registration.pipeline import PipelineConfig
from dreg.registration.plan import (
    RegistrationPlan,
    StagePlan,
    input_versions,
    plan_registration,
)

FAILURES_LISTED = 200  # in a stage summary; every block is in the stage's table
VERSIONED_PACKAGES = ("dreg", "prefect", "prefect-dask", "itk-elastix", "zarr", "dask")


class StageTimings(BaseModel):
    """Seconds spent by one stage, measured by its flow."""

    seconds: float
    register_seconds: float
    reduce_seconds: float


class StageSummary(BaseModel):
    """One stage's record (stage.json), and its part of result.json."""

    number: int
    name: str
    flow_run_id: str
    level: int
    transform: str
    blocks: int
    counts: dict[str, int]
    reused: int = Field(0, description="blocks taken from the block store, not registered")
    failed_share: float = 0.0
    field: str
    identity: str
    seconds: float
    register_seconds: float
    reduce_seconds: float
    block_seconds: float
    field_voxels: int
    failures: list[dict] = Field(default_factory=list)

    def relocated(self, move: Callable[[str], str]) -> StageSummary:
        """This summary with its location inside OUT (the field) passed through `move`."""
        return self.model_copy(update={"field": move(self.field)})

    def document(self, out_uri: str) -> dict:
        """The JSON of stage.json: the field named relative to OUT."""
        return self.relocated(lambda uri: locations.inside(uri, out_uri)).model_dump(
            mode="json")


def summarize_stage(
    stage: StagePlan,
    results: Sequence[BlockResult],
    identity: str,
    field_voxels: int,
    timings: StageTimings,
    flow_run_id: str,
) -> StageSummary:
    """A stage's summary from its block results and what its flow measured."""
    failed = sum(r.status == FAILED for r in results)
    return StageSummary(
        number=stage.number,
        name=stage.name,
        flow_run_id=flow_run_id,
        level=stage.level,
        transform=stage.config.transform,
        blocks=len(results),
        counts=dict(Counter(r.status for r in results)),
        reused=sum(r.reused for r in results),
        failed_share=round(failed / len(results), 4) if results else 0.0,
        field=stage.field_uri(identity),
        identity=identity,
        # compute spent in this run: blocks reused from the store cost nothing here
        block_seconds=round(sum(r.seconds for r in results if not r.reused), 3),
        field_voxels=field_voxels,
        failures=[r.row() for r in results if r.status != OK][:FAILURES_LISTED],
        **{k: round(v, 3) for k, v in timings.model_dump().items()},
    )


class InitialRecord(BaseModel):
    matrix: list[list[float]]
    translation: list[float]


class RegistrationResult(BaseModel):
    """A finished registration: what result.json says and the flow returns.

    In memory every location is whole (the flow returns it, events and artifacts carry
    it); result.json names what lies inside OUT relative to OUT, and `load_result`
    resolves it against the OUT it is given: a copied or moved OUT is used, never the
    one it was copied from. `output` is the OUT the result was read from (in the file:
    the one it was written in, for information only).
    """

    output: str
    field: str
    result: str
    fixed: str
    moving: str
    flow_run_id: str
    initial: InitialRecord
    stages: list[StageSummary]
    seconds: float
    versions: dict[str, str | None] = Field(default_factory=dict)
    input_versions: dict[str, str] = Field(
        default_factory=dict, description="content versions of fixed and moving, as read")
    pipeline: dict = Field(default_factory=dict, description="the pipeline that ran")
    qc: str | None = Field(None, description="quality control: ok, warn, or None if not run")
    qc_reason: str = Field("", description="why quality control warns")

    @computed_field
    @property
    def block_counts(self) -> dict[str, dict[str, int]]:
        """Blocks by status, per stage name."""
        return {s.name: s.counts for s in self.stages}

    @computed_field
    @property
    def blocks_reused(self) -> dict[str, int]:
        """Blocks taken from the block store rather than registered, per stage name."""
        return {s.name: s.reused for s in self.stages}

    @computed_field
    @property
    def failed_blocks(self) -> int:
        """Blocks whose registration failed (after retries), over all stages; there the
        field falls back to the stage before."""
        return sum(s.counts.get(FAILED, 0) for s in self.stages)

    @computed_field
    @property
    def failed_share(self) -> float:
        total = sum(s.blocks for s in self.stages)
        return round(self.failed_blocks / total, 4) if total else 0.0

    def relocated(self, move: Callable[[str], str]) -> RegistrationResult:
        """This result with every location inside OUT (the field, result.json, each
        stage's field) passed through `move`; the inputs (fixed, moving) never lie inside
        OUT and stay as they are."""
        return self.model_copy(update={
            "field": move(self.field), "result": move(self.result),
            "stages": [stage.relocated(move) for stage in self.stages]})

    def document(self) -> str:
        """The JSON text of result.json: what lies inside OUT named relative to OUT."""
        return self.relocated(lambda uri: locations.inside(uri, self.output)).model_dump_json(
            indent=2)


def check_failed_share(stage: StageSummary, max_share: float) -> None:
    """A stage in which more than `max_share` of the blocks failed fails the run: its
    field would quietly fall back to the stage before over too much of the image."""
    if stage.failed_share > max_share:
        failed = stage.counts.get(FAILED, 0)
        raise RunFailed(
            f"stage {stage.name}: {failed} of {stage.blocks} blocks failed "
            f"({stage.failed_share:.1%}, more than the {max_share:.1%} allowed by "
            f"--max-failed-share); no result written; see "
            f"{stage.field.rsplit('/', 1)[0]}/blocks.json"
        )


def check_last_stage(stages: Sequence[StageSummary]) -> None:
    """A run whose last stage has no successful block is a failed run: its field would be
    the stage before's (or the identity) while claiming to be the registration."""
    last = stages[-1]
    if last.counts.get(OK, 0) == 0:
        raise RunFailed(
            f"stage {last.name}: no block succeeded ({last.blocks} blocks: "
            f"{', '.join(f'{n} {s}' for s, n in sorted(last.counts.items()))}); no result "
            f"written; see {last.field.rsplit('/', 1)[0]}/blocks.json"
        )


def package_versions() -> dict[str, str | None]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def registration_result(
    plan: RegistrationPlan, stages: Sequence[StageSummary], flow_run_id: str, seconds: float
) -> RegistrationResult:
    return RegistrationResult(
        output=plan.out_uri,
        field=plan.field_uri,
        result=plan.result_uri,
        fixed=plan.fixed_uri,
        moving=plan.moving_uri,
        flow_run_id=flow_run_id,
        initial=InitialRecord(matrix=[list(r) for r in plan.initial.matrix],
                              translation=list(plan.initial.translation)),
        stages=list(stages),
        seconds=round(seconds, 3),
        versions=package_versions(),
        input_versions=plan.input_versions,
        pipeline=pipeline_of(plan).model_dump(mode="json"),
    )


def pipeline_of(plan: RegistrationPlan) -> PipelineConfig:
    return PipelineConfig(stages=[stage.config for stage in plan.stages])


def finished_with_same_inputs(out_uri: str, fixed_uri: str, moving_uri: str,
                              pipeline: PipelineConfig | None) -> RegistrationResult | None:
    """OUT's finished result when it was computed from these very inputs (same images,
    same content, same pipeline as planned; None: the built-in one), else None: a
    repeated request is then nothing to do."""
    try:
        result = load_result(out_uri)
    except InputError:
        return None
    fixed, moving = (storage.normalize_uri(u) for u in (fixed_uri, moving_uri))
    if (result.fixed, result.moving) != (fixed, moving):
        return None
    try:  # read as the model, so that a field added since (at its default) still matches
        recorded = PipelineConfig.model_validate(result.pipeline)
        # The result records the stages as planned (defaults that depend on the images
        # made explicit), so the request is compared as planned too.
        planned = pipeline_of(plan_registration(fixed, moving, out_uri, pipeline,
                                                overwrite=True, versions=False))
    except (ValueError, InputError):
        return None
    if recorded.model_dump(mode="json") != planned.model_dump(mode="json"):
        return None
    current = input_versions(ome_zarr.open_image(fixed), ome_zarr.open_image(moving))
    return result if result.input_versions == current else None


def load_result(out_uri: str) -> RegistrationResult:
    """The finished registration in `out_uri`, from its result.json, with every location
    inside OUT resolved against `out_uri` (whatever folder the result was written in: a
    copied or moved OUT is itself); an InputError naming the location when there is none
    (a run that has not finished, or not a registration output at all)."""
    out_uri = storage.normalize_uri(out_uri)
    uri = storage.join(out_uri, RESULT_FILE)
    if not completion.file_is_complete(uri):
        raise InputError(f"{out_uri}: no finished registration here (no {RESULT_FILE})")
    try:
        recorded = RegistrationResult.model_validate_json(storage.read_text(uri))
    except ValueError as exc:
        raise InputError(f"{uri}: not a registration result ({first_line(exc)})") from None
    # Older results stored absolute locations inside the OUT they were written in.
    return recorded.relocated(
        lambda path: locations.resolve(path, out_uri, recorded.output)).model_copy(
        update={"output": out_uri})
