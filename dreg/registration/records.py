"""The typed records of a registration run: its options, each stage's summary, and the
result that result.json holds and the flow returns.

Flows fill these from what their tasks return; nothing else builds these documents.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, computed_field

from dreg.errors import InputError, first_line
from dreg.io import storage
from dreg.registration.outcome import OK, BlockResult
from dreg.registration.plan import RESULT_FILE, RegistrationPlan, StagePlan

FAILURES_LISTED = 200  # in a stage summary; every block is in the stage's table
VERSIONED_PACKAGES = ("dreg", "prefect", "prefect-dask", "itk-elastix", "zarr", "dask")


class RunOptions(BaseModel):
    """How a registration runs, as opposed to what it computes (that is the pipeline)."""

    model_config = ConfigDict(extra="forbid")

    overwrite: bool = Field(False, description="replace a finished result in the output")
    dask_address: str | None = Field(
        None, description="an existing Dask scheduler; default $DREG_DASK_ADDRESS, else local"
    )
    workers: int | None = Field(None, ge=1, description="local cluster workers (default: cores)")
    debug: bool = Field(False, description="write elastix logs per block")
    show_progress: bool = Field(False, description="a progress bar of blocks on stderr")
    block_retries: int = Field(2, ge=0, description="attempts after a block's first failure")


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
    field: str
    identity: str
    seconds: float
    register_seconds: float
    reduce_seconds: float
    block_seconds: float
    field_voxels: int
    failures: list[dict] = Field(default_factory=list)


def summarize_stage(
    stage: StagePlan,
    results: Sequence[BlockResult],
    identity: str,
    field_voxels: int,
    timings: StageTimings,
    flow_run_id: str,
) -> StageSummary:
    """A stage's summary from its block results and what its flow measured."""
    return StageSummary(
        number=stage.number,
        name=stage.name,
        flow_run_id=flow_run_id,
        level=stage.level,
        transform=stage.config.transform,
        blocks=len(results),
        counts=dict(Counter(r.status for r in results)),
        field=stage.field_uri,
        identity=identity,
        block_seconds=round(sum(r.seconds for r in results), 3),
        field_voxels=field_voxels,
        failures=[r.row() for r in results if r.status != OK][:FAILURES_LISTED],
        **{k: round(v, 3) for k, v in timings.model_dump().items()},
    )


class InitialRecord(BaseModel):
    matrix: list[list[float]]
    translation: list[float]


class RegistrationResult(BaseModel):
    """A finished registration: what result.json says and the flow returns."""

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

    @computed_field
    @property
    def block_counts(self) -> dict[str, dict[str, int]]:
        """Blocks by status, per stage name."""
        return {s.name: s.counts for s in self.stages}

    def document(self) -> str:
        """The JSON text of result.json."""
        return self.model_dump_json(indent=2)


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
    )


def load_result(out_uri: str) -> RegistrationResult:
    """The finished registration in `out_uri`, from its result.json; an InputError naming
    the location when there is none (a run that has not finished, or not a registration
    output at all)."""
    out_uri = storage.normalize_uri(out_uri)
    uri = storage.join(out_uri, RESULT_FILE)
    if not storage.exists(uri):
        raise InputError(f"{out_uri}: no finished registration here (no {RESULT_FILE})")
    try:
        return RegistrationResult.model_validate_json(storage.read_text(uri))
    except ValueError as exc:
        raise InputError(f"{uri}: not a registration result ({first_line(exc)})") from None
