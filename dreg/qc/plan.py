"""Plan the quality control of a finished (or just finished) registration.

Everything QC reads is settled here, before any work: the field and its chunk grid (cut
into bricks, each one task), the coarse lattice on which the similarity is measured and
the pyramid levels it reads, the intensity ranges of the joint histograms, the point
the pictures' slices go through, and the stage tables. Only small things are read: the
coarsest pyramid levels and metadata.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict

from dreg.errors import InputError
from dreg.field import AffineTransform, open_field
from dreg.grid import Grid, Region, region_from_bounds
from dreg.io import completion, ome_zarr, storage
from dreg.layout import BLOCK_TABLE, QC_FOLDER, QC_PAGE, WARPED_NAME
from dreg.qc.sampling import level_for_spacing, mean_spacing
from dreg.registration.plan import FOREGROUND_FRACTION_OF_P99
from dreg.registration.records import RegistrationResult

FOLD_THRESHOLD = 0.001  # share of field voxels with det J <= 0 above which QC warns
LATTICE_POINTS = 2**21  # at most this many field voxels carry the similarity
HISTOGRAM_BINS = 32
PICTURE_PIXELS = 512  # the pictures' slices come from the finest level this small
MAX_BRICKS = 512  # bricks grow (1, 2, 4 chunks per axis) until there are no more
BRICK_SIZES = (1, 2, 4)
RANGE_PERCENTILES = (0.5, 99.5)


class StageRef(BaseModel):
    """What QC needs of one stage: its record and how its blocks were cut."""

    number: int
    name: str
    level: int
    transform: str
    blocks: int
    counts: dict[str, int]
    table: str
    block_size: int | tuple[int, int, int] | None = None
    overlap: float = 0.25
    field_grid_factor: int = 2


class QcPlan(BaseModel):
    """Where QC reads and writes, and how it samples. Plain data: it crosses to workers."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    out: str
    folder: str
    field: str
    fixed: str
    moving: str
    warped: str | None
    initial: AffineTransform
    field_grid: Grid
    field_chunks: tuple[int, int, int]
    brick_chunks: int
    lattice_stride: int
    fixed_level: int
    moving_level: int
    warped_level: int | None
    fixed_range: tuple[float, float]
    moving_range: tuple[float, float]
    bins: int = HISTOGRAM_BINS
    centre_xyz: tuple[float, float, float]
    picture_level: int
    unit: str | None
    stages: list[StageRef]
    fold_threshold: float

    @property
    def page_uri(self) -> str:
        return storage.join(self.folder, QC_PAGE)

    def picture_uri(self, name: str) -> str:
        return storage.join(self.folder, f"{name}.png")


def qc_folder(out_uri: str) -> str:
    return storage.join(out_uri, QC_FOLDER)


def plan_qc(result: RegistrationResult, fold_threshold: float = FOLD_THRESHOLD) -> QcPlan:
    """The QC of `result`'s registration (its field, images and stage tables must
    exist; result.json need not yet). InputError naming the input otherwise."""
    if not 0 <= fold_threshold < 1:
        raise InputError(f"fold threshold {fold_threshold}: a share between 0 and 1")
    field = open_field(result.field)
    fixed = ome_zarr.open_image(result.fixed, require_scalar=True)
    moving = ome_zarr.open_image(result.moving, require_scalar=True)
    grid = field.levels[0].grid
    stride = lattice_stride(grid.shape_zyx)
    spacing = stride * mean_spacing(grid)
    warped = current_warped(result)
    return QcPlan(
        out=result.output,
        folder=qc_folder(result.output),
        field=field.uri,
        fixed=fixed.uri,
        moving=moving.uri,
        warped=warped.uri if warped else None,
        initial=AffineTransform(matrix=tuple(tuple(r) for r in result.initial.matrix),
                                translation=tuple(result.initial.translation)),
        field_grid=grid,
        field_chunks=field.levels[0].chunks_zyx,
        brick_chunks=brick_chunks(grid.shape_zyx, field.levels[0].chunks_zyx),
        lattice_stride=stride,
        fixed_level=level_for_spacing(fixed, spacing),
        moving_level=level_for_spacing(moving, spacing),
        warped_level=level_for_spacing(warped, spacing) if warped else None,
        fixed_range=intensity_range(fixed),
        moving_range=intensity_range(moving),
        centre_xyz=foreground_centre(fixed),
        picture_level=picture_level(fixed),
        unit=fixed.unit,
        stages=stage_refs(result),
        fold_threshold=fold_threshold,
    )


def current_warped(result: RegistrationResult) -> ome_zarr.OmeZarrImage | None:
    """OUT's warped moving image, when it is complete and was made from this very field
    with linear interpolation; else None (QC then resamples what it needs itself)."""
    uri = storage.join(result.output, WARPED_NAME)
    attributes = completion.record(uri)
    if completion.completed_identity(attributes) is None:
        return None
    made_from = (attributes.get("image"), attributes.get("field"), attributes.get("interpolation"))
    if made_from != (result.moving, result.field, "linear"):
        return None
    return ome_zarr.open_image(uri)


def lattice_stride(shape_zyx, points: int = LATTICE_POINTS) -> int:
    """The smallest stride along every axis of the field grid that leaves at most
    `points` voxels for the similarity."""
    stride = 1
    while math.prod(math.ceil(n / stride) for n in shape_zyx) > points:
        stride += 1
    return stride


def brick_chunks(shape_zyx, chunks_zyx) -> int:
    """Chunks per axis of one brick (one task): the smallest of 1, 2, 4 that leaves at
    most MAX_BRICKS bricks (else 4), so that a large field is a few hundred tasks, not
    tens of thousands, and a brick reads its one-voxel halo once for all its chunks."""
    for size in BRICK_SIZES:
        bricks = math.prod(math.ceil(n / (c * size))
                           for n, c in zip(shape_zyx, chunks_zyx, strict=True))
        if bricks <= MAX_BRICKS:
            return size
    return BRICK_SIZES[-1]


def brick_regions(plan: QcPlan) -> list[Region]:
    """The bricks of the field grid, in C order: each whole chunks."""
    size = tuple(c * plan.brick_chunks for c in plan.field_chunks)
    return list(ome_zarr.chunk_regions(plan.field_grid.shape_zyx, size))


def _coarsest(image: ome_zarr.OmeZarrImage) -> np.ndarray:
    level = len(image.levels) - 1
    return ome_zarr.read_region(image, level, region_from_bounds(
        (0, 0, 0), image.levels[level].grid.shape_zyx))


def intensity_range(image: ome_zarr.OmeZarrImage) -> tuple[float, float]:
    """The histogram range of an image: its 0.5th to 99.5th percentile on the coarsest
    level (values beyond it count in the first or last bin)."""
    low, high = (float(v) for v in np.percentile(_coarsest(image), RANGE_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


def foreground_centre(fixed: ome_zarr.OmeZarrImage) -> tuple[float, float, float]:
    """The world point (x, y, z) at the centre of the fixed image's foreground (voxels
    above a tenth of the 99th percentile, as registration counts foreground), on the
    coarsest level; the image's centre when it has no foreground."""
    data = _coarsest(fixed)
    grid = fixed.levels[-1].grid
    threshold = FOREGROUND_FRACTION_OF_P99 * np.percentile(data, 99)
    where = np.argwhere(data > threshold)
    index = where.mean(axis=0) if len(where) else (np.asarray(grid.shape_zyx) - 1) / 2
    return tuple(float(v) for v in grid.index_to_world(index))


def picture_level(fixed: ome_zarr.OmeZarrImage, pixels: int = PICTURE_PIXELS) -> int:
    """The finest level whose longest axis has at most `pixels` voxels (else the
    coarsest): the pictures' slices are read from it."""
    for number, lv in enumerate(fixed.levels):
        if max(lv.grid.shape_zyx) <= pixels:
            return number
    return len(fixed.levels) - 1


def stage_refs(result: RegistrationResult) -> list[StageRef]:
    configs = {s.get("name"): s for s in (result.pipeline or {}).get("stages", [])}
    refs = []
    for stage in result.stages:
        config = configs.get(stage.name, {})
        block_size = config.get("block_size")
        refs.append(StageRef(
            number=stage.number, name=stage.name, level=stage.level,
            transform=stage.transform, blocks=stage.blocks, counts=stage.counts,
            table=storage.join(stage.field.rsplit("/", 1)[0], BLOCK_TABLE),
            block_size=tuple(block_size) if isinstance(block_size, list) else block_size,
            overlap=config.get("overlap", 0.25),
            field_grid_factor=config.get("field_grid_factor", 2)))
    return refs
