"""The block-registration seam: how one block pair is registered, as a small protocol.

`dreg.registration.block` does everything around a block (reading it, finding and
resampling the moving region through the previous transform, the metric guard, the
store); a `BlockMethod` only registers the fixed block against the pre-warped moving
block and returns the residual. Elastix is the built-in method
(`dreg.registration.elastix.ElastixMethod`).

A stage names its method as plain data (`StageConfig.method`), because the name crosses
to Dask workers and is resolved there: a built-in name, or a ``module:attribute`` import
path to an object that follows `BlockMethod` (for tests, or a method of your own).
Import paths come only from a trusted pipeline: parameters that arrive with an event are
held to the built-in methods (`check_built_in`).
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dreg.errors import InputError
from dreg.grid import Grid
from dreg.registration.pipeline import StageConfig

DEFAULT_METHOD = "elastix"
# Built-in methods by name: the import path of their implementation.
BUILT_IN = {"elastix": "dreg.registration.elastix:ElastixMethod"}
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class BlockPair:
    """One block to register: both images on the padded block's grid.

    `warped` is the moving image resampled onto `block_grid` through the stage's
    previous transform, so the method registers `fixed` against it from the identity.
    The residual is wanted on `field_grid`, the block's share of the stage's field grid.
    `previous` is that transform (something `dreg.field.displacement_of` samples), and
    the images' locations are given too, for a method that needs more than the arrays.
    """

    name: str
    fixed: np.ndarray
    warped: np.ndarray
    block_grid: Grid
    field_grid: Grid
    transform: str
    parameters: dict
    previous: Any = None
    fixed_uri: str = ""
    moving_uri: str = ""
    threads: int = 1
    log_dir: str | None = None


@dataclass(frozen=True)
class BlockRegistration:
    """What a method returns for one block.

    `residual` is r(x) on the pair's `field_grid`, (3, z, y, x) with world (z, y, x)
    components, such that a fixed point x corresponds to the warped block's point
    x + r(x). `result_image` is the warped block resampled onto the block's grid through
    the residual: the metric guard compares it with the fixed block.
    """

    residual: np.ndarray
    result_image: np.ndarray


@runtime_checkable
class BlockMethod(Protocol):
    """A way to register one block pair. An implementation is built from its name in
    each process that needs it (never pickled), once; a block's outcome may depend only
    on the pair and on what `version` names.

    A method may also offer ``planned_stage(stage, size_zyx) -> StageConfig``: called
    while planning, after the checks, it returns the stage with the defaults that depend
    on the block size made explicit (elastix: its B-spline grid spacing)."""

    name: str

    def version(self) -> str:
        """What identifies the implementation's behaviour (a package version): part of
        every block's key in the block store, so results of two versions never mix."""
        ...

    def check_parameters(self, stage: StageConfig) -> None:
        """While planning, in the flow process (cheaply: load nothing heavy): raise
        InputError naming a parameter of the stage that this method would reject or
        misread."""
        ...

    def check_block_size(self, stage: StageConfig, size_zyx: tuple[int, ...]) -> None:
        """While planning (blocked stages only): raise InputError when the stage's blocks,
        `size_zyx` voxels, are too small for its transform and parameters."""
        ...

    def register(self, pair: BlockPair) -> BlockRegistration:
        """Register the pair. Raises RuntimeError, whose first line is the reason, when
        the registration itself fails (the block is then recorded as failed); any other
        error fails the block's task."""
        ...


def is_built_in(name: str) -> bool:
    return name in BUILT_IN


def check_name(name: str) -> str:
    """A method's name as a stage may give it: a built-in name or an import path."""
    if is_built_in(name) or IMPORT_PATH.match(name):
        return name
    raise ValueError(f"method must be one of {', '.join(BUILT_IN)} or a module:attribute "
                     f"import path, got {name!r}")


def check_built_in(names, where: str) -> None:
    """Refuse any method that is not built in: for pipelines whose parameters are not
    trusted (an import path would run code of the sender's choosing)."""
    for name in names:
        if not is_built_in(name):
            raise InputError(f"{where}: method {name!r} is not allowed here (only "
                             f"{', '.join(BUILT_IN)})")


@functools.cache
def resolve(name: str) -> BlockMethod:
    """The method a stage names, built once per process."""
    path = BUILT_IN.get(name, name)
    module_name, _, attribute = path.partition(":")
    if not IMPORT_PATH.match(path):
        raise InputError(f"unknown registration method {name!r} (one of "
                         f"{', '.join(BUILT_IN)}, or a module:attribute import path)")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"registration method {name!r} cannot be loaded: {exc}") from None
    method = found() if isinstance(found, type) else found
    if not isinstance(method, BlockMethod):
        raise InputError(f"registration method {name!r} does not provide name, version, "
                         "check_parameters, check_block_size and register")
    return method
