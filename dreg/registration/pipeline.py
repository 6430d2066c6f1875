"""The pipeline configuration: one typed model, loaded from YAML or given as a dict.

It renders as a form in the Prefect UI (it is a flow parameter) and loads from YAML with
the keys ``stages: [{name, level, block_size, overlap, method, transform, parameters,
field_grid_factor, foreground_threshold, metric_guard}]``. Unknown keys and values are
errors that name them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dreg.documents import MAX_DOCUMENT_BYTES, load_yaml
from dreg.errors import InputError
from dreg.registration.tiling import block_count

ParameterValue = str | int | float | bool | list[str | int | float | bool]


class StageConfig(BaseModel):
    """One resolution stage."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names the stage's folder")
    level: int = Field(0, description="pyramid level; negative counts from the coarsest")
    block_size: int | tuple[int, int, int] | None = Field(
        None, description="block size in voxels (one number, or z, y, x); none: whole image"
    )
    overlap: float = Field(0.25, ge=0, lt=1, description="padding, a fraction of the block")
    method: str = Field(
        "elastix", description="how each block is registered: elastix, or a "
        "module:attribute import path (dreg.registration.method)")
    transform: Literal["translation", "rigid", "affine", "bspline"] = "bspline"
    parameters: dict[str, ParameterValue] = Field(
        default_factory=dict, description="the method's parameter overrides (elastix's)"
    )
    field_grid_factor: int = Field(2, ge=1, le=16, description="field spacing / image spacing")
    foreground_threshold: float = Field(
        0.05, ge=0, le=1, description="skip a block with a smaller foreground fraction"
    )
    metric_guard: bool = Field(True, description="reject a block whose similarity worsens")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value):
        from dreg.registration.method import check_name  # it imports this module

        return check_name(value)

    @field_validator("block_size")
    @classmethod
    def _positive_block(cls, value):
        sizes = (value,) * 3 if isinstance(value, int) else value
        if sizes is not None and min(sizes) < 8:
            raise ValueError(f"block_size must be at least 8 voxels, got {value}")
        return value


class PipelineConfig(BaseModel):
    """The stages of a registration, coarse to fine."""

    model_config = ConfigDict(extra="forbid")

    stages: list[StageConfig] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages):
        names = [s.name for s in stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(duplicates)}")
        return stages


# The built-in pipeline's B-spline block edges, smallest first, and how many blocks it
# cuts level 0 into before it takes the next edge. Blocks of 64 register the most
# accurately (bench/README.md, "Accuracy"); but a block's CPU follows elastix's samples
# and iterations more than its voxels (a 128^3 block costs about twice a 64^3 one), so
# past 512 blocks (a 512^3 image) the built-in pipeline takes blocks of 128 with the
# same 16-voxel B-spline grid: a 1024^3 pair then registers in 512 blocks rather than
# 4,096, about a third of the CPU (the whole job in 45 minutes on 2 cores, RMS 0.038
# voxel on a synthetic pair: "The whole job"). A pipeline that sets block_size is never
# changed.
DEFAULT_BLOCK_EDGES = (64, 128)
MAX_DEFAULT_BLOCKS = 512


def default_block_edge(shape_zyx: tuple[int, int, int] | None) -> int:
    """The built-in pipeline's B-spline block edge for a level 0 of `shape_zyx` voxels
    (the smallest edge for a shape unknown)."""
    if shape_zyx is None:
        return DEFAULT_BLOCK_EDGES[0]
    fitting = [edge for edge in DEFAULT_BLOCK_EDGES
               if block_count(shape_zyx, edge) <= MAX_DEFAULT_BLOCKS]
    return fitting[0] if fitting else DEFAULT_BLOCK_EDGES[-1]


def default_pipeline(shape_zyx: tuple[int, int, int] | None = None) -> PipelineConfig:
    """A global affine at the coarsest level, then B-spline blocks at full resolution:
    blocks of 64, or of 128 where the fixed image's level 0 (`shape_zyx`) would need
    more than MAX_DEFAULT_BLOCKS blocks of 64."""
    return PipelineConfig(
        stages=[
            StageConfig(name="affine", level=-1, transform="affine"),
            StageConfig(name="bspline", level=0, block_size=default_block_edge(shape_zyx),
                        overlap=0.25, transform="bspline"),
        ]
    )


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}" + (f" (got {item['input']!r})"
                     if item["type"] in ("literal_error", "extra_forbidden") else ""))
    return "; ".join(parts)


def parse_pipeline(data: dict | PipelineConfig, source: str = "pipeline") -> PipelineConfig:
    """Validate a pipeline given as a dict; errors name the offending keys."""
    if isinstance(data, PipelineConfig):
        return data
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{source}: {_describe(exc)}") from None


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read a pipeline from a YAML file (bounded in size; no aliases)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:  # bounded: a device or a huge file is not read whole
            data = handle.read(MAX_DOCUMENT_BYTES + 1)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise InputError(f"{path}: more than a pipeline may hold ({MAX_DOCUMENT_BYTES} "
                             "bytes)")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such pipeline file") from None
    except (OSError, UnicodeError) as exc:
        raise InputError(f"{path}: unreadable pipeline file ({type(exc).__name__})") from None
    data = load_yaml(text, str(path))
    if not isinstance(data, dict):
        raise InputError(f"{path}: a pipeline is a mapping with a 'stages' list")
    return parse_pipeline(data, str(path))


class InitialAffine(BaseModel):
    """A user-supplied starting transform: moving = matrix @ fixed + translation (world
    x, y, z, physical units), as ITK applies an affine transform with centre 0."""

    # A NaN or infinite entry would make every block's moving region undefined.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    matrix: tuple[tuple[float, float, float], tuple[float, float, float],
                  tuple[float, float, float]] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def to_transform(self):
        from dreg.field.displacement import AffineTransform

        return AffineTransform(matrix=self.matrix, translation=self.translation)
