"""An exact block-registration method for tests: the residual a synthetic pair's truth
implies, with no elastix.

`dreg.synth.write_pair` writes truth.ome.zarr next to fixed.ome.zarr: u with fixed(x) =
moving(x + u(x)). A block's warped image is moving(y + p(y)), p the stage's previous
transform, so the residual r that maps the block exactly solves r(x) + p(x + r(x)) =
u(x); a fixed-point iteration finds it (p is smooth and small). Fast and deterministic:
flow tests of batching, resume, failure handling, QC and the CLI use it where elastix is
not what they test.

Stages select it with ``method=METHOD``. Its parameter ``seconds`` makes each block
take at least that long (a stand-in for a registration's work), for tests that
interrupt a run mid-stage; ``hold`` (a local folder) and ``free`` (a number) let the
first `free` blocks through and hold every later one until the test puts a file named
``open`` into that folder (`open_hold`), so that a stage is surely still running when
the test has done something to it. The residual depends on neither.

Dask worker processes import it by that path: LocalCluster workers started by a test
get the test process's sys.path (which holds tests/); for a `dreg` command run as a
subprocess, `subprocess_env` puts tests/ on PYTHONPATH.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from dreg.field import AffineTransform, as_transform, displacement_of
from dreg.grid import Grid, components_to_vectors, vectors_to_components, whole_region
from dreg.io import storage
from dreg.registration.method import BlockPair, BlockRegistration

METHOD = "exact_registrar:ExactRegistrar"
TESTS = str(Path(__file__).resolve().parent)
ITERATIONS = 8


def subprocess_env(env: dict | None = None) -> dict:
    """An environment in which a `dreg` subprocess (and its Dask workers) can import
    this module."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, env.get("PYTHONPATH")]))
    return env


def truth_uri(fixed_uri: str) -> str:
    """The truth field that write_pair puts next to the fixed image."""
    return storage.join(fixed_uri.rstrip("/").rsplit("/", 1)[0], "truth.ome.zarr")


HOLD_TIMEOUT_S = 600


def wait_unless_free(folder: Path, free: int) -> None:
    """Take the next ticket of `folder` (a file made exclusively, so that the blocks of
    all processes count together); beyond the first `free` tickets, wait until `folder`
    holds a file named ``open``."""
    ticket = 0
    while True:
        try:
            os.close(os.open(folder / f"ticket-{ticket}", os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            ticket += 1
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while ticket >= free and not (folder / "open").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{folder} was not opened within {HOLD_TIMEOUT_S} s")
        time.sleep(0.1)


def open_hold(folder: Path) -> None:
    """Let every held block of `folder` through."""
    (folder / "open").touch()


def exact_residual(truth, previous, points_xyz: np.ndarray) -> np.ndarray:
    """r at world points (..., 3), as world (x, y, z) vectors: r + p(x + r) = u(x)."""
    u = displacement_of(truth, points_xyz)
    residual = u - displacement_of(previous, points_xyz)
    for _ in range(ITERATIONS):
        residual = u - displacement_of(previous, points_xyz + residual)
    return residual


def residual_on(grid: Grid, truth, previous) -> np.ndarray:
    """r at every voxel of `grid`, as (3, z, y, x) with world (z, y, x) components."""
    points = grid.region_points(whole_region(grid.shape_zyx))
    return vectors_to_components(exact_residual(truth, previous, points)).astype(np.float32)


class ExactRegistrar:
    """The `BlockMethod` that knows the answer. The transform is ignored, and every
    parameter but ``seconds``, ``hold`` and ``free``; a pair without a truth field fails the block
    (RuntimeError), as elastix may."""

    name = "exact"

    def version(self) -> str:
        return "1"

    def check_parameters(self, stage) -> None:
        return None

    def check_block_size(self, stage, size_zyx) -> None:
        return None

    def register(self, pair: BlockPair) -> BlockRegistration:
        time.sleep(float(pair.parameters.get("seconds", 0)))
        if pair.parameters.get("hold"):
            wait_unless_free(Path(pair.parameters["hold"]), int(pair.parameters.get("free", 0)))
        uri = truth_uri(pair.fixed_uri)
        if not storage.exists(uri):
            raise RuntimeError(f"no truth field next to the fixed image ({uri})")
        truth = as_transform(uri)
        previous = pair.previous if pair.previous is not None else AffineTransform()
        # The result image: the warped block resampled through the residual, as elastix
        # returns it; the metric guard compares it with the fixed block.
        on_block = residual_on(pair.block_grid, truth, previous)
        points = pair.block_grid.region_points(whole_region(pair.block_grid.shape_zyx))
        moved = points + components_to_vectors(on_block)
        index = pair.block_grid.world_to_index(moved.reshape(-1, 3))
        result = ndimage.map_coordinates(pair.warped, index.T, order=1, mode="nearest")
        return BlockRegistration(
            residual=residual_on(pair.field_grid, truth, previous),
            result_image=result.reshape(pair.block_grid.shape_zyx).astype(np.float32))
