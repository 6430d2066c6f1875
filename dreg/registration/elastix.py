"""The ITK-Elastix boundary: parameter maps, registering two arrays, sampling the result,
and `ElastixMethod`, the built-in block-registration method (dreg.registration.method).

Everything of ITK stays inside this module: callers pass NumPy arrays in (z, y, x) order
with a `Grid`, and parameter maps as dicts of lists of strings (which pickle, unlike an
elastix ParameterObject). ITK is imported lazily so that importing dreg stays cheap.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreg.errors import InputError, first_line
from dreg.grid import Grid, vectors_to_components, zyx_to_xyz
from dreg.io import storage
from dreg.registration.method import BlockPair, BlockRegistration
from dreg.registration.parameters import (
    DEFAULT_RESOLUTIONS,
    as_values,
    check_parameters,
    is_known,
)
from dreg.registration.pipeline import StageConfig

PRESETS = ("translation", "rigid", "affine", "bspline")
MIN_BSPLINE_CELLS = 3  # a block must span at least this many B-spline grid cells
# A B-spline stage that sets no grid spacing gets the preset's 8 voxels, or 16 where its
# blocks are at least 64 voxels along every axis. On 64^3 blocks (80^3 with padding) the
# 16-voxel grid gave 0.55-0.73x the RMS error of the 8-voxel one on all four cases of
# bench/accuracy.py (two synthetic pairs, one anisotropic; a brain in T1 and in a T2-like
# contrast), at less CPU; on small images it was worse (a whole 48^3 image: RMS 0.36
# against 0.11), hence the threshold (bench/README.md, "Accuracy").
COARSE_GRID_VOXELS = 16
COARSE_GRID_MIN_BLOCK = 64
GRID_SPACING_KEYS = ("FinalGridSpacingInVoxels", "FinalGridSpacingInPhysicalUnits")
SCHEDULE = re.compile(r"^(GridSpacing|(Fixed|Moving)?ImagePyramid(Rescale|Smoothing)?)Schedule$")
ParameterMap = dict[str, list[str]]

# Settings applied over elastix's default map for each preset, before user overrides.
# The B-spline preset differs from elastix's default map in two ways that cut a block's
# CPU about threefold at the same accuracy (bench/README.md, "Per-block cost"): Mattes MI
# alone, without the default map's TransformBendingEnergyPenalty (at its default weight
# its gradient is about 1/500 of the metric's, yet it costs two thirds of each
# iteration), and the optimizer's step-size estimation from 250 samples instead of one
# per transform parameter (0.65-1.3 s per resolution on an 80^3 block). A user who
# wants the penalty sets Metric and Metric1Weight.
_PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    "translation": {"MaximumNumberOfIterations": 200},
    "rigid": {"MaximumNumberOfIterations": 200},
    "affine": {"MaximumNumberOfIterations": 256},
    "bspline": {"MaximumNumberOfIterations": 256, "FinalGridSpacingInVoxels": 8,
                "Metric": "AdvancedMattesMutualInformation",
                "NumberOfJacobianMeasurements": 250},
}


@functools.cache
def _itk():
    import itk

    return itk


def set_threads(threads: int) -> None:
    """ITK's default thread count for this process (elastix and filters)."""
    _itk().MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))


def parameter_map(
    preset: str, overrides: dict[str, Any] | None = None, threads: int = 1
) -> ParameterMap:
    """Elastix's default map for a preset, with this project's settings and `overrides`.

    `overrides` maps parameter names to a value or a list of values; numbers and booleans
    are written as elastix expects them.
    """
    if preset not in PRESETS:
        choices = ", ".join(PRESETS)
        raise InputError(f"unknown transform preset {preset!r} (choose one of {choices})")
    overrides = dict(overrides or {})
    resolutions = int(as_values(overrides.get("NumberOfResolutions", DEFAULT_RESOLUTIONS))[0])
    itk = _itk()
    default = itk.ParameterObject.New().GetDefaultParameterMap(preset, resolutions)
    pmap: ParameterMap = {key: list(values) for key, values in dict(default).items()}
    settings = dict(_PRESET_SETTINGS[preset])
    if preset == "bspline" and "FinalGridSpacingInPhysicalUnits" not in overrides:
        pmap.pop("FinalGridSpacingInPhysicalUnits", None)
    if preset == "bspline" and "Metric" not in overrides:
        pmap.pop("Metric1Weight", None)  # the default map's penalty, which the preset drops
    settings.update(
        {
            "MaximumNumberOfThreads": threads,
            "ResultImagePixelType": "float",
            # register() resamples the result itself: elastix's resampler took about
            # three times as long (0.9 s against 0.35 s on an 80^3 block).
            "WriteResultImage": False,
            "FinalBSplineInterpolationOrder": 1,
        }
    )
    settings.update(overrides)
    for key, value in settings.items():
        pmap[key] = as_values(value)
    return pmap


def bspline_grid_spacing_voxels(overrides: dict[str, Any] | None = None) -> float | None:
    """The final B-spline grid spacing in voxels that `parameter_map("bspline", overrides)`
    will use, or None when the overrides set it in physical units instead. Needs no ITK,
    so that planning a registration does not load elastix."""
    overrides = overrides or {}
    if "FinalGridSpacingInPhysicalUnits" in overrides:
        return None
    value = overrides.get("FinalGridSpacingInVoxels",
                          _PRESET_SETTINGS["bspline"]["FinalGridSpacingInVoxels"])
    return max(float(v) for v in as_values(value))


def with_grid_spacing(stage: StageConfig, block_zyx: tuple[int, ...]) -> StageConfig:
    """`stage` with the coarser B-spline grid made explicit in its parameters where its
    blocks (`block_zyx`, as tiled on the level) allow it and it sets no spacing itself;
    otherwise `stage` unchanged. Explicit, so that records and stored blocks' keys show
    the grid each block was registered with."""
    if (stage.transform != "bspline" or min(block_zyx) < COARSE_GRID_MIN_BLOCK
            or any(key in stage.parameters for key in GRID_SPACING_KEYS)):
        return stage
    return stage.model_copy(update={"parameters": {
        **stage.parameters, "FinalGridSpacingInVoxels": COARSE_GRID_VOXELS}})


def to_itk_image(array: np.ndarray, grid: Grid):
    """An ITK float image of a (z, y, x) array placed on `grid`."""
    itk = _itk()
    image = itk.image_view_from_array(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing(grid.spacing_xyz)
    image.SetOrigin(grid.origin_xyz)
    image.SetDirection(itk.matrix_from_array(grid.direction_matrix))
    return image


@dataclass
class Registration:
    """The result of one elastix run: an ITK transform (fixed to moving) and the moving
    image resampled onto the fixed grid through it."""

    transform: Any
    result_image: np.ndarray


def register(
    fixed: np.ndarray,
    moving: np.ndarray,
    grid: Grid,
    pmap: ParameterMap,
    log_file: str | None = None,
) -> Registration:
    """Register `moving` to `fixed`, both sampled on `grid`.

    Raises RuntimeError with elastix's message when elastix fails.
    """
    itk = _itk()
    fixed_image = to_itk_image(fixed, grid)
    moving_image = to_itk_image(moving, grid)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(pmap)
    method = itk.ElastixRegistrationMethod.New(fixed_image, moving_image)
    method.SetParameterObject(parameters)
    method.SetLogToConsole(False)
    if log_file:
        method.SetOutputDirectory(os.path.dirname(log_file))
        method.SetLogFileName(os.path.basename(log_file))
        method.SetLogToFile(True)
    else:
        method.SetLogToFile(False)
    method.Update()
    transform = method.ConvertToItkTransform(method.GetCombinationTransform())
    return Registration(transform=transform,
                        result_image=resampled(moving_image, fixed_image, transform))


def resampled(moving_image, fixed_image, transform) -> np.ndarray:
    """The moving image on the fixed image's grid through `transform` (fixed to moving),
    linearly interpolated, 0 outside the moving image; a (z, y, x) float32 array."""
    itk = _itk()
    interpolator = itk.LinearInterpolateImageFunction[type(moving_image), itk.D].New()
    result = itk.resample_image_filter(moving_image, transform=transform,
                                       interpolator=interpolator, use_reference_image=True,
                                       reference_image=fixed_image, default_pixel_value=0)
    return np.array(itk.array_view_from_image(result), dtype=np.float32)


def displacement_on_grid(transform, grid: Grid) -> np.ndarray:
    """T(x) - x at every voxel of `grid`, as (3, z, y, x) with world (z, y, x) components."""
    itk = _itk()
    vector_image = itk.Image[itk.Vector[itk.F, 3], 3]
    sampler = itk.TransformToDisplacementFieldFilter[vector_image, itk.D].New()
    sampler.SetTransform(transform)
    sampler.SetUseReferenceImage(False)
    sampler.SetSize([int(n) for n in zyx_to_xyz(grid.shape_zyx)])
    sampler.SetOutputSpacing(grid.spacing_xyz)
    sampler.SetOutputOrigin(grid.origin_xyz)
    sampler.SetOutputDirection(itk.matrix_from_array(grid.direction_matrix))
    sampler.Update()
    vectors_xyz = np.array(itk.array_view_from_image(sampler.GetOutput()), dtype=np.float32)
    return vectors_to_components(vectors_xyz).copy()


def hold_past_block(residual: np.ndarray, field_grid: Grid, block_grid: Grid) -> np.ndarray:
    """Give the field voxels that lie past the block's last voxel centre along an axis
    the residual of the last field voxel before it, in place; returns `residual`
    (3, z, y, x) on `field_grid`, whose axes are the block grid's.

    elastix's B-spline is zero past its image, so the field's outer layer (past the
    image's last voxel centre, reached only by border blocks) would fall back to the
    previous stage there and fold.
    """
    last = np.asarray(block_grid.shape_zyx) - 1
    for axis in range(3):
        step = np.zeros((field_grid.shape_zyx[axis], 3))
        step[:, axis] = np.arange(field_grid.shape_zyx[axis])
        along = block_grid.world_to_index(field_grid.index_to_world(step))[:, axis]
        inside = int(np.count_nonzero(along <= last[axis] + 1e-6))
        if 0 < inside < len(along):
            source = [slice(None)] * 4
            source[axis + 1] = slice(inside - 1, inside)
            target = [slice(None)] * 4
            target[axis + 1] = slice(inside, None)
            residual[tuple(target)] = residual[tuple(source)]
    return residual


def _tiny_pair(size: int = 24) -> tuple[np.ndarray, np.ndarray, Grid]:
    z, y, x = np.mgrid[0:size, 0:size, 0:size].astype(np.float32)
    fixed = np.sin(x / 3) + np.cos(y / 4) + np.sin((z + x) / 5)
    moving = np.sin((x + 1) / 3) + np.cos(y / 4) + np.sin((z + x + 1) / 5)
    return fixed, moving, Grid((size, size, size), (1.0, 1.0, 1.0))


def check_parameter_map(pmap: ParameterMap, name: str = "stage") -> None:
    """Run elastix briefly on a tiny image, so that a map elastix rejects fails early.

    The second line of defence after `parameters.check_parameters` (which runs while
    planning): it catches what only elastix knows, such as a combination of components
    it refuses, or a parameter name it neither uses nor documents (a misspelling, which
    elastix would otherwise ignore). The message names the parameter when elastix does.
    """
    trial = {key: list(values) for key, values in pmap.items()}
    trial["MaximumNumberOfIterations"] = ["2"]
    trial["NumberOfResolutions"] = ["1"]
    # Schedules hold values per resolution: with one resolution they would not fit.
    for key in [k for k in trial if SCHEDULE.match(k)]:
        trial.pop(key)
    fixed, moving, grid = _tiny_pair()
    with tempfile.TemporaryDirectory(prefix="dreg-preflight-") as folder:
        log_file = os.path.join(folder, "elastix.log")
        try:
            register(fixed, moving, grid, trial, log_file=log_file)
            failure = None
        except Exception as exc:  # noqa: BLE001 - elastix raises RuntimeError; its log says why
            failure = exc
        log = Path(log_file).read_text(errors="replace") if os.path.exists(log_file) else ""
    if failure is not None:
        raise InputError(f"{name}: {_rejection(log, trial, failure)}") from None
    unknown = [p for p in re.findall(r"Unused parameter: (\S+)", log)
               if p in pmap and not is_known(p)]
    if unknown:
        raise InputError(f"{name}: parameter {unknown[0]} is not used by elastix (not one of "
                         "its parameters, or misspelt); remove or correct it")


def _rejection(log: str, trial: ParameterMap, failure: BaseException) -> str:
    """Why elastix refused a map, in one line naming the parameter where its log does."""
    lines = [line.strip() for line in log.splitlines()]
    causes = [_cleaned(line) for line in lines if line.startswith("Description:")]
    cause = causes[-1] if causes else first_line(failure)
    named = re.search(r'parameter "(\w+)"', cause)
    if named:
        return f"parameter {named.group(1)}: elastix rejected it: {cause}"
    missing = re.search(r"could not be created: (\S+)", cause)
    if missing:
        keys = [k for k, values in trial.items() if missing.group(1) in values]
        if keys:
            return f"parameter {keys[0]}: elastix rejected it: {cause}"
    return f"elastix rejected the parameters: {cause}"


def _cleaned(line: str) -> str:
    """An elastix log's 'Description: ITK ERROR: Class(0x..): ERROR: text' as 'text'."""
    line = re.sub(r"^Description:\s*", "", line)
    line = re.sub(r"^ITK ERROR:\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", line)
    return re.sub(r"^(ERROR:\s*)+", "", line).strip()


def warm_up(threads: int = 1) -> None:
    """Pay elastix's first-use cost (about 11 s per process) now, not in the first block."""
    set_threads(threads)
    fixed, moving, grid = _tiny_pair(16)
    pmap = parameter_map("translation", {"MaximumNumberOfIterations": 2,
                                         "NumberOfResolutions": 1}, threads)
    register(fixed, moving, grid, pmap)


@functools.lru_cache(maxsize=16)
def _cached_map(transform: str, overrides_json: str, threads: int) -> tuple:
    set_threads(threads)  # before any ITK filter of this process runs
    pmap = parameter_map(transform, json.loads(overrides_json), threads)
    check_parameter_map(pmap, f"{transform} parameters")
    return tuple(pmap.items())


def cached_parameter_map(transform: str, overrides: dict[str, Any] | None,
                         threads: int = 1) -> ParameterMap:
    """A stage's parameter map, built and tried once per process, when a block first
    needs elastix (never in a process that only reuses stored blocks)."""
    key = json.dumps(overrides or {}, sort_keys=True)
    return dict(_cached_map(transform, key, threads))


def version() -> str:
    """The installed ITK-Elastix version (a block's outcome depends on it)."""
    try:
        return importlib.metadata.version("itk-elastix")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class ElastixMethod:
    """Elastix as a block-registration method: the stage's transform preset with its
    parameter overrides; the parameter map is built and tried once per process, when a
    block first needs it (so a process that only reuses stored blocks never loads ITK)."""

    name = "elastix"

    def version(self) -> str:
        return version()

    def check_parameters(self, stage: StageConfig) -> None:
        check_parameters(stage.transform, stage.parameters, stage.name)

    def planned_stage(self, stage: StageConfig, size_zyx: tuple[int, ...]) -> StageConfig:
        return with_grid_spacing(stage, size_zyx)

    def check_block_size(self, stage: StageConfig, size_zyx: tuple[int, ...]) -> None:
        spacing = (bspline_grid_spacing_voxels(stage.parameters)
                   if stage.transform == "bspline" else None)
        if spacing and min(size_zyx) < MIN_BSPLINE_CELLS * spacing:
            raise InputError(
                f"stage {stage.name}: block_size {stage.block_size} is too small for a "
                f"B-spline grid spacing of {spacing:g} voxels (needs at least "
                f"{int(MIN_BSPLINE_CELLS * spacing)} voxels per axis)"
            )

    def register(self, pair: BlockPair) -> BlockRegistration:
        """Run elastix; with a log folder, its log goes there (elastix writes a local
        file, which is then copied, so the folder may be on S3)."""
        pmap = cached_parameter_map(pair.transform, pair.parameters, pair.threads)
        if not pair.log_dir:
            result = register(pair.fixed, pair.warped, pair.block_grid, pmap)
        else:
            with tempfile.TemporaryDirectory(prefix="dreg-elastix-") as local:
                log_file = os.path.join(local, f"elastix-{pair.name}.log")
                try:
                    result = register(pair.fixed, pair.warped, pair.block_grid, pmap,
                                      log_file)
                finally:
                    if os.path.exists(log_file):
                        with open(log_file, "rb") as handle:
                            storage.write_bytes(
                                storage.join(pair.log_dir, os.path.basename(log_file)),
                                handle.read())
        residual = displacement_on_grid(result.transform, pair.field_grid)
        return BlockRegistration(
            residual=hold_past_block(residual, pair.field_grid, pair.block_grid),
            result_image=result.result_image)
