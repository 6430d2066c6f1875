"""The ITK-Elastix boundary: parameter maps, registering two arrays, sampling the result.

Everything of ITK stays inside this module: callers pass NumPy arrays in (z, y, x) order
with a `Grid`, and parameter maps as dicts of lists of strings (which pickle, unlike an
elastix ParameterObject). ITK is imported lazily so that importing dreg stays cheap.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from dreg.errors import InputError, first_line
from dreg.grid import Grid, vectors_to_components, zyx_to_xyz

PRESETS = ("translation", "rigid", "affine", "bspline")
DEFAULT_RESOLUTIONS = 2
ParameterMap = dict[str, list[str]]

# Settings applied over elastix's default map for each preset, before user overrides.
_PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    "translation": {"MaximumNumberOfIterations": 200},
    "rigid": {"MaximumNumberOfIterations": 200},
    "affine": {"MaximumNumberOfIterations": 256},
    "bspline": {"MaximumNumberOfIterations": 256, "FinalGridSpacingInVoxels": 8},
}


@functools.cache
def _itk():
    import itk

    return itk


def set_threads(threads: int) -> None:
    """ITK's default thread count for this process (elastix and filters)."""
    _itk().MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))


def _as_strings(value: Any) -> list[str]:
    values = value if isinstance(value, list | tuple) else [value]
    out = []
    for v in values:
        if isinstance(v, bool):
            out.append("true" if v else "false")
        else:
            out.append(str(v))
    return out


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
    resolutions = int(_as_strings(overrides.get("NumberOfResolutions", DEFAULT_RESOLUTIONS))[0])
    itk = _itk()
    default = itk.ParameterObject.New().GetDefaultParameterMap(preset, resolutions)
    pmap: ParameterMap = {key: list(values) for key, values in dict(default).items()}
    settings = dict(_PRESET_SETTINGS[preset])
    if preset == "bspline" and "FinalGridSpacingInPhysicalUnits" not in overrides:
        pmap.pop("FinalGridSpacingInPhysicalUnits", None)
    settings.update(
        {
            "MaximumNumberOfThreads": threads,
            "ResultImagePixelType": "float",
            "WriteResultImage": True,
            "FinalBSplineInterpolationOrder": 1,
        }
    )
    settings.update(overrides)
    for key, value in settings.items():
        pmap[key] = _as_strings(value)
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
    return max(float(v) for v in _as_strings(value))


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
        import os

        method.SetOutputDirectory(os.path.dirname(log_file))
        method.SetLogFileName(os.path.basename(log_file))
        method.SetLogToFile(True)
    else:
        method.SetLogToFile(False)
    method.Update()
    transform = method.ConvertToItkTransform(method.GetCombinationTransform())
    result = np.array(itk.array_view_from_image(method.GetOutput()), dtype=np.float32)
    return Registration(transform=transform, result_image=result)


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


def _tiny_pair(size: int = 24) -> tuple[np.ndarray, np.ndarray, Grid]:
    z, y, x = np.mgrid[0:size, 0:size, 0:size].astype(np.float32)
    fixed = np.sin(x / 3) + np.cos(y / 4) + np.sin((z + x) / 5)
    moving = np.sin((x + 1) / 3) + np.cos(y / 4) + np.sin((z + x + 1) / 5)
    return fixed, moving, Grid((size, size, size), (1.0, 1.0, 1.0))


def check_parameter_map(pmap: ParameterMap, name: str = "stage") -> None:
    """Run elastix briefly on a tiny image so that a map elastix rejects fails early."""
    trial = {key: list(values) for key, values in pmap.items()}
    trial["MaximumNumberOfIterations"] = ["2"]
    trial["NumberOfResolutions"] = ["1"]
    for key in ("GridSpacingSchedule", "ImagePyramidSchedule",
                "FixedImagePyramidSchedule", "MovingImagePyramidSchedule"):
        trial.pop(key, None)
    fixed, moving, grid = _tiny_pair()
    try:
        register(fixed, moving, grid, trial)
    except Exception as exc:  # noqa: BLE001 - elastix raises RuntimeError with its log
        raise InputError(f"{name}: elastix rejected the parameters: {first_line(exc)}") from None


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
