"""Plan a registration: validate the inputs and lay out every stage before any work.

Every check that can fail on bad input runs here, so a bad run stops in seconds with a
message naming the input: images that are not 3D or do not overlap in physical space,
levels that do not exist, block sizes too small for the B-spline grid, an output that
is not writable or already holds a finished result, an output inside (or holding) an
input, and parameters that the stage's registration method (elastix by default) would
reject or misuse.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dreg.errors import InputError, RunFailed
from dreg.field import AffineTransform
from dreg.grid import Grid
from dreg.io import completion, locations, ome_zarr, storage
from dreg.layout import (
    BLOCK_STORE,
    BLOCK_TABLE,
    FIELD_NAME,
    RESULT_FILE,
    STAGE_FILE,
    STAGES_FOLDER,
    field_name,
    stage_folder_name,
)
from dreg.registration.block import StageContext
from dreg.registration.method import resolve as resolve_method
from dreg.registration.pipeline import PipelineConfig, StageConfig, default_pipeline
from dreg.registration.tiling import normalize_block_size

FOREGROUND_FRACTION_OF_P99 = 0.1
# One block is registered in one worker process: bound its size (256^3 voxels, 64 MiB
# of float32 per image) so that no step loads a large level whole.
MAX_BLOCK_VOXELS = 256**3


@dataclass(frozen=True)
class StagePlan:
    """One stage laid out: what it reads and where it writes. Its elastix parameter map
    is built on a worker (loading elastix costs hundreds of MB: not in the flow process)."""

    number: int
    config: StageConfig
    level: int
    fixed_grid: Grid
    moving_grid: Grid
    field_grid: Grid
    folder: str

    @property
    def name(self) -> str:
        return self.config.name

    def field_uri(self, identity: str) -> str:
        """Where the stage's field with this content identity lives. A stage's field is
        never rewritten in place: other content gets another name, and stage.json says
        which one is the stage's result."""
        return storage.join(self.folder, field_name(identity[:16]))

    @property
    def store_dir(self) -> str:
        """The block store: each block's record and residual (dreg.registration.store)."""
        return storage.join(self.folder, BLOCK_STORE)

    @property
    def table_uri(self) -> str:
        return storage.join(self.folder, BLOCK_TABLE)

    @property
    def summary_uri(self) -> str:
        return storage.join(self.folder, STAGE_FILE)


def remove_stale_fields(stage: StagePlan, keep: str) -> None:
    """Remove the stage's fields other than `keep` (made by earlier runs from other
    inputs or settings). Only the run that owns OUT calls this, after stage.json names
    `keep`, so no reader is left pointing at what is removed."""
    fs, root = storage.filesystem(stage.folder)
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("field-") and base.endswith(".ome.zarr"):
            uri = storage.join(stage.folder, base)
            if uri != keep:
                storage.remove_tree(uri)


@dataclass(frozen=True)
class RegistrationPlan:
    fixed_uri: str
    moving_uri: str
    out_uri: str
    stages: tuple[StagePlan, ...]
    initial: AffineTransform
    foreground_intensity: float
    # The content version of each input (result.json records it), and of each of its
    # levels (the block store's keys), from one listing of its chunks. Empty in a plan
    # made without versions, which only validates the request (the CLI's first check).
    input_versions: dict[str, str]
    level_versions: dict[str, tuple[str, ...]]

    @property
    def field_uri(self) -> str:
        return storage.join(self.out_uri, FIELD_NAME)

    @property
    def result_uri(self) -> str:
        return storage.join(self.out_uri, RESULT_FILE)


def code_version() -> str:
    """A hash of the core library's source: a code change invalidates cached blocks."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def check_inputs_meet(fixed: ome_zarr.OmeZarrImage, moving: ome_zarr.OmeZarrImage,
                  initial: AffineTransform) -> None:
    """The fixed image, mapped through the initial transform, must meet the moving image."""
    f_lo, f_hi = fixed.levels[0].grid.world_bounds()
    corners = np.array([[x, y, z] for x in (f_lo[0], f_hi[0]) for y in (f_lo[1], f_hi[1])
                        for z in (f_lo[2], f_hi[2])])
    mapped = corners + initial.displacement(corners)
    m_lo, m_hi = moving.levels[0].grid.world_bounds()
    spacing = np.asarray(moving.levels[0].grid.spacing_xyz)
    if np.any(mapped.max(axis=0) < m_lo - spacing) or np.any(mapped.min(axis=0) > m_hi + spacing):
        raise InputError(
            f"the images do not overlap in physical space: fixed {fixed.uri} spans "
            f"{np.round(f_lo, 3).tolist()}..{np.round(f_hi, 3).tolist()}, moving {moving.uri} "
            f"spans {np.round(m_lo, 3).tolist()}..{np.round(m_hi, 3).tolist()} (world x, y, z)"
        )


def _planned_stage(stage: StageConfig, grid: Grid) -> StageConfig:
    """The stage as its method will run it on `grid` (the method may make a default
    explicit that depends on the block size: elastix's B-spline grid spacing)."""
    method = resolve_method(stage.method)
    planned = getattr(method, "planned_stage", None)
    return planned(stage, normalize_block_size(stage.block_size, grid.shape_zyx)) \
        if planned else stage


def _check_block_size(stage: StageConfig, grid: Grid) -> None:
    size = normalize_block_size(stage.block_size, grid.shape_zyx)
    padded = [min(n, round(b * (1 + stage.overlap))) for b, n in zip(size, grid.shape_zyx,
                                                                      strict=True)]
    if int(np.prod(padded)) > MAX_BLOCK_VOXELS:
        what = "the whole level" if stage.block_size is None else f"block_size {size}"
        raise InputError(
            f"stage {stage.name}: {what} at level {stage.level} is {padded} voxels with "
            f"padding, more than one worker should hold ({MAX_BLOCK_VOXELS} voxels); "
            "set a smaller block_size or a coarser level"
        )
    if stage.block_size is None:
        return
    resolve_method(stage.method).check_block_size(stage, size)


def _stage_folder(out_uri: str, number: int, name: str) -> str:
    return storage.join(out_uri, STAGES_FOLDER, stage_folder_name(number, name))


def _coarsest_finite(image: ome_zarr.OmeZarrImage, role: str) -> np.ndarray:
    """The finite voxels of the image's coarsest level (small by construction, so cheap
    to read); InputError when there are none (an all-NaN or all-infinite image)."""
    coarsest = image.levels[-1]
    data = ome_zarr.read_region(image, len(image.levels) - 1,
                                tuple(slice(0, n) for n in coarsest.grid.shape_zyx))
    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data.ravel()
    if finite.size == 0:
        raise InputError(f"{role} {image.uri}: no finite voxel at its coarsest level "
                         "(the image is all NaN or infinite)")
    return finite


def foreground_intensity(fixed: ome_zarr.OmeZarrImage) -> float:
    """The intensity above which a fixed voxel counts as foreground: a tenth of the 99th
    percentile of the coarsest level's finite voxels."""
    return float(FOREGROUND_FRACTION_OF_P99 * np.percentile(_coarsest_finite(fixed, "FIXED"), 99))


def check_same_units(fixed: ome_zarr.OmeZarrImage, moving: ome_zarr.OmeZarrImage) -> None:
    """Both images' physical units must agree where both state them: a fixed image in
    micrometers and a moving image in millimeters do not overlap as their numbers say."""
    if fixed.unit and moving.unit and fixed.unit != moving.unit:
        raise InputError(f"the images' units differ: fixed {fixed.uri} is in {fixed.unit}, "
                         f"moving {moving.uri} in {moving.unit}; convert one so that both "
                         "use the same unit")


def plan_registration(
    fixed_uri: str,
    moving_uri: str,
    out_uri: str,
    pipeline: PipelineConfig | None = None,
    initial: AffineTransform | None = None,
    overwrite: bool = False,
    versions: bool = True,
) -> RegistrationPlan:
    """Validate inputs and lay out the stages. Raises InputError/StorageError on bad input.
    With no `pipeline`, the built-in one for the fixed image's size (`default_pipeline`).

    With `versions` (a run starts), both inputs are fingerprinted: every chunk of every
    level is listed once. Without (a check before the run), nothing is listed: the plan
    only says that the request is valid, and cannot run.
    """
    fixed = ome_zarr.open_image(fixed_uri, require_scalar=True)
    moving = ome_zarr.open_image(moving_uri, require_scalar=True)
    out_uri = storage.normalize_uri(out_uri)
    # Before anything is written under OUT (the writability probe included).
    locations.check_apart(out_uri, "OUT", {"FIXED": fixed.uri, "MOVING": moving.uri})
    initial = initial or AffineTransform.identity()
    check_same_units(fixed, moving)
    check_inputs_meet(fixed, moving, initial)

    pipeline = pipeline or default_pipeline(fixed.levels[0].grid.shape_zyx)
    stages = []
    for number, stage in enumerate(pipeline.stages, start=1):
        resolve_method(stage.method).check_parameters(stage)
        level = fixed.level_number(stage.level)
        try:
            moving_level = moving.level(stage.level)
        except InputError as exc:
            raise InputError(f"stage {stage.name}: {exc}") from None
        fixed_grid = fixed.levels[level].grid
        _check_block_size(stage, fixed_grid)
        stage = _planned_stage(stage, fixed_grid)
        stages.append(
            StagePlan(
                number=number,
                config=stage,
                level=level,
                fixed_grid=fixed_grid,
                moving_grid=moving_level.grid,
                field_grid=fixed_grid.coarsened(float(stage.field_grid_factor)),
                folder=_stage_folder(out_uri, number, stage.name),
            )
        )

    plan = RegistrationPlan(
        fixed_uri=fixed.uri,
        moving_uri=moving.uri,
        out_uri=out_uri,
        stages=tuple(stages),
        initial=initial,
        foreground_intensity=foreground_intensity(fixed),
        input_versions={},
        level_versions={},
    )
    _coarsest_finite(moving, "MOVING")
    if completion.file_is_complete(plan.result_uri) and not overwrite:
        raise InputError(
            f"{out_uri}: already holds a finished registration (result.json); "
            "pass --overwrite to replace it"
        )
    storage.check_writable(out_uri)
    if not versions:
        return plan
    # Last: on a large input in object storage, listing every chunk takes the longest.
    found = _versions(fixed, moving)
    return replace(plan, input_versions=found[0], level_versions=found[1])


def _versions(fixed: ome_zarr.OmeZarrImage, moving: ome_zarr.OmeZarrImage
              ) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """The plan's input_versions and level_versions, each image listed once."""
    found = {"fixed": ome_zarr.image_version(fixed), "moving": ome_zarr.image_version(moving)}
    return ({role: v.whole for role, v in found.items()},
            {role: v.levels for role, v in found.items()})


def _level_version(plan: RegistrationPlan, role: str, level: int) -> str:
    """One input's version at a level, as planned (the error of OmeZarrImage.level when
    the image has no such level)."""
    versions = plan.level_versions[role]
    if not 0 <= level < len(versions):
        uri = plan.fixed_uri if role == "fixed" else plan.moving_uri
        raise InputError(f"{uri}: level {level} does not exist (the image has levels "
                         f"0..{len(versions) - 1})")
    return versions[level]


def input_versions(fixed: ome_zarr.OmeZarrImage, moving: ome_zarr.OmeZarrImage) -> dict[str, str]:
    """The content versions of both inputs (every level)."""
    return {"fixed": ome_zarr.fingerprint(fixed), "moving": ome_zarr.fingerprint(moving)}


def check_inputs_unchanged(plan: RegistrationPlan) -> None:
    """Fail a run whose inputs changed while it ran (a chunk rewritten or deleted): its
    blocks may have read a mix of old and new content."""
    now = input_versions(ome_zarr.open_image(plan.fixed_uri),
                         ome_zarr.open_image(plan.moving_uri))
    for role, uri in (("fixed", plan.fixed_uri), ("moving", plan.moving_uri)):
        if now[role] != plan.input_versions[role]:
            raise RunFailed(
                f"the {role} image {uri} changed during the run (its chunks or metadata "
                "differ from when the run started); no result written; re-run once it is "
                "stable"
            )


def stage_context(
    plan: RegistrationPlan,
    stage: StagePlan,
    previous_field: str | None,
    previous_identity: str,
    debug: bool = False,
    storage_patience: float = 300.0,
) -> StageContext:
    """What every block of a stage shares, with the content versions of both images at
    the stage's level (for the block store), taken from the plan: nothing is listed
    again. `previous_field` is the field of the stage before, or None for the first stage
    (which starts from the plan's initial affine)."""
    if not plan.level_versions:
        raise ValueError("a plan made without input versions only validates; it cannot run")
    return StageContext(
        fixed_uri=plan.fixed_uri,
        moving_uri=plan.moving_uri,
        level=stage.level,
        fixed_grid=stage.fixed_grid,
        moving_grid=stage.moving_grid,
        field_grid=stage.field_grid,
        previous=previous_field if previous_field is not None else plan.initial,
        method=stage.config.method,
        transform=stage.config.transform,
        parameters=dict(stage.config.parameters),
        foreground_intensity=plan.foreground_intensity,
        foreground_fraction=stage.config.foreground_threshold,
        metric_guard=stage.config.metric_guard,
        store_dir=stage.store_dir,
        fixed_version=_level_version(plan, "fixed", stage.level),
        moving_version=_level_version(plan, "moving", stage.level),
        previous_identity=previous_identity,
        code_version=code_version(),
        storage_patience=storage_patience,
        log_dir=storage.join(stage.folder, "elastix-logs") if debug else None,
    )
