"""Synthetic pairs: the stored truth is exact and the pair is determined by the seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli import images as images_cli
from cli import main as cli
from dreg import field, synth
from dreg.grid import Grid
from dreg.io import ome_zarr, pyramid


def rotation_zx(degrees_z: float, degrees_x: float) -> tuple:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple(tuple(row) for row in rz @ rx)


GRIDS = {
    "isotropic": Grid((24, 28, 32), (1.0, 1.0, 1.0)),
    "oblique": Grid((20, 26, 30), (0.6, 0.9, 1.7), (5.0, -7.0, 12.0), rotation_zx(35, -20)),
}


def whole(image: ome_zarr.OmeZarrImage, level: int = 0) -> np.ndarray:
    shape = image.level(level).grid.shape_zyx
    return ome_zarr.read_region(image, level, tuple(slice(0, n) for n in shape))


@pytest.mark.parametrize("case", sorted(GRIDS))
def test_texture_at_x_plus_truth_reproduces_fixed(tmp_path, case):
    grid = GRIDS[case]
    summary = synth.write_pair(str(tmp_path), grid, seed=5, amplitude_voxels=2.5,
                               shift_voxels=(1.0, -2.0, 0.5), chunks=16)
    model = synth.make_model(grid, seed=5, amplitude_voxels=2.5, shift_voxels=(1.0, -2.0, 0.5))
    fixed = whole(ome_zarr.open_image(summary["fixed"]))
    moving = whole(ome_zarr.open_image(summary["moving"]))
    truth = field.open_field(summary["truth"])
    u_zyx = whole(truth)  # (3, z, y, x), world components z, y, x

    points = grid.region_points(tuple(slice(0, n) for n in grid.shape_zyx))
    u_xyz = np.moveaxis(u_zyx, 0, -1)[..., ::-1].astype(float)
    reproduced = model.texture(points + u_xyz)

    # Equal to float32 precision: both sides are float32 roundings, and u's own float32
    # rounding (~1e-7 of a few voxels) moves the texture by far less than a step.
    float_precision = 2 * np.spacing(np.abs(fixed).max())
    assert np.abs(reproduced - fixed).max() <= float_precision
    np.testing.assert_array_equal(moving, model.texture(points))
    # The displacement is real: without it, fixed and moving differ clearly.
    assert np.abs(fixed - moving).mean() > 5
    # The field's metadata places it on the fixed grid and names the pair.
    assert truth.levels[0].grid == grid
    assert truth.attributes["grid"] == grid.to_dict()
    assert truth.attributes["fixed"]["uri"] == summary["fixed"]
    assert truth.attributes["moving"]["uri"] == summary["moving"]
    # Sampling the field at voxel centres gives the model's displacement to float32.
    np.testing.assert_allclose(field.sample_field(truth, points[::3, ::5, ::7]),
                               model.displacement(points[::3, ::5, ::7]), rtol=0, atol=1e-6)


def test_the_seed_determines_the_pair(tmp_path):
    grid = GRIDS["oblique"]
    first = synth.write_pair(str(tmp_path / "a"), grid, seed=3, chunks=16)
    again = synth.write_pair(str(tmp_path / "b"), grid, seed=3, chunks=8, workers=1)
    other = synth.write_pair(str(tmp_path / "c"), grid, seed=4, chunks=16)
    for name in ("fixed", "moving", "truth"):
        a = whole(ome_zarr.open_image(first[name]))
        # Same seed: identical voxels, whatever the chunking and parallelism.
        assert np.array_equal(a, whole(ome_zarr.open_image(again[name]))), name
        assert not np.array_equal(a, whole(ome_zarr.open_image(other[name]))), name


def test_pair_has_a_pyramid_on_the_fixed_grid(tmp_path):
    grid = Grid((40, 70, 130), (0.8, 0.8, 2.0), (1.0, 2.0, 3.0))
    summary = synth.write_pair(str(tmp_path), grid, chunks=32)
    for name in ("fixed", "moving"):
        image = ome_zarr.open_image(summary[name])
        assert [lv.grid for lv in image.levels] == pyramid.pyramid_grids(grid)
        assert [lv.grid.shape_zyx for lv in image.levels] == [(40, 70, 130), (20, 35, 65),
                                                              (10, 18, 33)]
        assert image.levels[0].dtype == "float32"
    assert summary["levels"] == 3


def test_synth_command_writes_the_pair_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "pair"
    status = cli.main(["synth", str(out), "--shape", "16,20,24", "--spacing", "0.5,1,2",
                       "--origin", "1,2,3", "--direction", "0,-1,0,1,0,0,0,0,1",
                       "--seed", "9", "--chunks", "8"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    fixed = ome_zarr.open_image(summary["fixed"])
    assert fixed.levels[0].grid == Grid((16, 20, 24), (0.5, 1, 2), (1, 2, 3),
                                        ((0, -1, 0), (1, 0, 0), (0, 0, 1)))
    assert fixed.levels[0].chunks_zyx == (8, 8, 8)
    assert summary["seed"] == 9
    assert field.open_field(str(out / "truth.ome.zarr")).components == 3
    # Refuses to replace the pair unless asked.
    assert cli.main(["synth", str(out), "--shape", "16,20,24"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_uint16_pair_holds_the_float_pair_scaled_and_rounded(tmp_path, capsys):
    assert images_cli.SYNTH_DTYPES == synth.DTYPES
    grid = Grid((16, 20, 24), (1.0, 1.0, 1.0))
    floats = synth.write_pair(str(tmp_path / "f"), grid, seed=4, chunks=8)
    assert cli.main(["synth", str(tmp_path / "u"), "--shape", "16,20,24", "--seed", "4",
                     "--chunks", "8", "--dtype", "uint16"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dtype"] == "uint16"
    for name in ("fixed", "moving"):
        image = ome_zarr.open_image(summary[name])
        assert [lv.dtype for lv in image.levels] == ["uint16"] * len(image.levels)
        values = whole(ome_zarr.open_image(floats[name])).astype(np.float64)
        expected = np.rint((values + 200.0) * 65536 / 640)
        assert expected.min() > 0 and expected.max() < 65535  # nothing clipped
        np.testing.assert_array_equal(whole(image), expected.astype(np.uint16))
    # The truth does not depend on the images' dtype.
    np.testing.assert_array_equal(whole(field.open_field(summary["truth"])),
                                  whole(field.open_field(floats["truth"])))
    with pytest.raises(SystemExit) as refused:
        cli.main(["synth", str(tmp_path / "x"), "--dtype", "int7"])
    assert refused.value.code == 2
    assert "--dtype" in capsys.readouterr().err


@pytest.mark.parametrize("private", ["", "1"], ids=["usual-umask", "DREG_PRIVATE"])
def test_outputs_follow_the_umask_and_dreg_private_makes_them_owner_only(
        tmp_path, monkeypatch, capsys, private):
    """Issue 18 "Also": under the usual umask (022) outputs are world-readable; with
    DREG_PRIVATE=1 no file or folder the command creates is readable by anyone else."""
    import os
    import stat

    monkeypatch.setenv("DREG_PRIVATE", private)
    previous = os.umask(0o022)
    try:
        assert cli.main(["synth", str(tmp_path / "pair"), "--shape", "8"]) == 0
    finally:
        os.umask(previous)
    capsys.readouterr()
    made = [tmp_path / "pair", *(tmp_path / "pair").rglob("*")]
    others = {str(p): stat.S_IMODE(p.stat().st_mode) & 0o077 for p in made}
    assert len(made) > 5
    if private:
        assert set(others.values()) == {0}, others
    else:
        assert all(mode & 0o044 == 0o044 for mode in others.values()), others
