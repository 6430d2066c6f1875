"""Writing and converting volumes larger than a memory budget stays within the budget.

Each command runs in a fresh process (tests/peak_rss.py) that first runs the same
command on a tiny input, so that every module, library and thread pool is loaded, and
then reports how far the big run raised the peak resident memory above that. The
volumes are well over the budget: an implementation that held one whole level (or the
whole input) in memory would exceed it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dreg import synth
from dreg.grid import Grid
from dreg.io import ome_zarr

PEAK_RSS = str(Path(__file__).with_name("peak_rss.py"))
BUDGET_MB = 100  # MiB, like the reports of peak_rss.py
# Synth's growth is about 50 MiB whatever the size (chunks in flight: 45.6 MiB at 320³,
# 51.6 at 256³, measured): a tighter budget, and volumes still well over it.
SYNTH_BUDGET_MB = 70
SYNTH_SHAPE = (288, 288, 288)  # fixed and moving 91 MiB each, the truth 273 MiB
CONVERT_N = 384  # 384^3 float32 = 216 MiB
MB = 2**20


@pytest.fixture
def scratch(tmp_path):
    """A folder removed after the test: these volumes are too big to leave behind."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def measure(warm: list[str], args: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DREG_S3_"))}
    result = subprocess.run([sys.executable, PEAK_RSS, *warm, "--", *args],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == 0, result.stderr
    return report


def test_synth_of_a_volume_larger_than_the_budget(scratch):
    assert np.prod(SYNTH_SHAPE) * 4 > 1.2 * SYNTH_BUDGET_MB * MB
    shape = ",".join(map(str, SYNTH_SHAPE))
    report = measure(["synth", str(scratch / "warm"), "--shape", "32"],
                     ["synth", str(scratch / "pair"), "--shape", shape, "--seed", "2"])

    assert report["growth_mb"] < SYNTH_BUDGET_MB, report
    # And it wrote the right thing: a far corner equals the model evaluated directly.
    grid = Grid(SYNTH_SHAPE, (1.0, 1.0, 1.0))
    fixed = ome_zarr.open_image(str(scratch / "pair" / "fixed.ome.zarr"))
    corner = (slice(268, 288), slice(0, 20), slice(258, 288))
    expected = synth.fixed_region(synth.make_model(grid, seed=2), grid, corner)
    assert np.array_equal(ome_zarr.read_region(fixed, 0, corner), expected)
    assert [lv.grid.shape_zyx[0] for lv in fixed.levels] == [288, 144, 72, 36]


def plane(z: int) -> np.ndarray:
    """Slice z of the big test volume: distinct values everywhere, made on demand."""
    n = CONVERT_N
    return np.arange(n * n, dtype=np.float32).reshape(n, n) + np.float32(7 * z)


def write_big_input(folder: Path, suffix: str) -> Path:
    """A CONVERT_N^3 float32 file written one plane at a time (never whole in memory)."""
    n = CONVERT_N
    path = folder / f"big{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, (plane(z) for z in range(n)), shape=(n, n, n), dtype="float32")
        return path
    if suffix == ".mha":
        header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\n"
                  "BinaryDataByteOrderMSB = False\nCompressedData = False\n"
                  "TransformMatrix = 0 1 0 -1 0 0 0 0 1\nOffset = 1 2 3\n"
                  f"ElementSpacing = 0.5 0.75 1.25\nDimSize = {n} {n} {n}\n"
                  "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    else:
        header = (f"NRRD0004\ntype: float\ndimension: 3\nsizes: {n} {n} {n}\n"
                  "space dimension: 3\nspace directions: (0.5,0,0) (0,0.75,0) (0,0,1.25)\n"
                  "space origin: (1,2,3)\nendian: little\nencoding: raw\n\n")
    with open(path, "wb") as handle:
        handle.write(header.encode())
        for z in range(n):
            handle.write(plane(z).tobytes())
    return path


def write_tiny_input(folder: Path, suffix: str) -> Path:
    path = folder / f"tiny{suffix}"
    data = np.ones((5, 6, 7), np.float32)
    if suffix == ".tif":
        tifffile.imwrite(path, data, photometric="minisblack")
    else:
        import itk

        itk.imwrite(itk.image_from_array(data), str(path))
    return path


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".tif"])
def test_convert_of_a_volume_larger_than_the_budget(scratch, suffix):
    assert CONVERT_N**3 * 4 > 2 * BUDGET_MB * MB
    tiny = write_tiny_input(scratch, suffix)
    big = write_big_input(scratch, suffix)
    out = scratch / "big.ome.zarr"
    report = measure(["convert", str(tiny), str(scratch / "warm.ome.zarr")],
                     ["convert", str(big), str(out)])

    assert report["growth_mb"] < BUDGET_MB, report
    image = ome_zarr.open_image(str(out))
    assert [lv.grid.shape_zyx[0] for lv in image.levels] == [384, 192, 96, 48]
    n = CONVERT_N
    for z in (0, 201, n - 1):
        got = ome_zarr.read_region(image, 0, (slice(z, z + 1), slice(0, n), slice(0, n)))
        assert np.array_equal(got[0], plane(z)), z
    if suffix != ".tif":
        assert image.levels[0].grid.spacing_xyz == (0.5, 0.75, 1.25)
        assert image.levels[0].grid.origin_xyz == (1.0, 2.0, 3.0)
