"""The registration flow end to end: Prefect's test harness (a real temporary server)
entered once per session, and a real LocalCluster. Real elastix where the test is about
the registration's result; the exact registrar (exact_registrar.py) where it is about
the orchestration: the block store, retries, failed blocks, batches."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest
from exact_registrar import METHOD
from prefect_queries import final_task_runs, wait_for_events

from dreg import field, synth
from dreg.grid import Grid
from dreg.io import ome_zarr, pyramid, storage
from dreg.qc.accuracy import field_error
from dreg.qc.jacobian import determinant
from dreg.registration import PipelineConfig, StageConfig
from flows.options import RunOptions

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

ROTATION_30 = ((0.8660254037844387, -0.5, 0.0), (0.5, 0.8660254037844387, 0.0), (0.0, 0.0, 1.0))


def bspline(block_size=32, iterations=100, **extra) -> StageConfig:
    return StageConfig(name="bspline", level=0, block_size=block_size, overlap=0.25,
                       transform="bspline",
                       parameters={"MaximumNumberOfIterations": iterations}, **extra)


def exact(block_size=24, iterations=30) -> StageConfig:
    """A blocked stage registered by the exact registrar; `iterations` is a parameter
    like any other: it is part of the block key."""
    return StageConfig(name="bspline", level=0, block_size=block_size, overlap=0.25,
                       transform="bspline", method=METHOD,
                       parameters={"MaximumNumberOfIterations": iterations})


def run(pair: dict, out: Path, stages: list[StageConfig], dask_address: str, **options):
    """A registration without QC (QC's own tests are in test_qc.py), unless asked."""
    from flows.registration import register_images

    options.setdefault("qc", False)
    return register_images(fixed=pair["fixed"], moving=pair["moving"], out=str(out),
                           pipeline=PipelineConfig(stages=stages),
                           options=RunOptions(dask_address=dask_address, **options))


def task_runs(stage_flow_run_id: str, name: str = "register-blocks") -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return final_task_runs(FlowRunFilter(id=FlowRunFilterId(any_=[UUID(stage_flow_run_id)])),
                           name)


def read_field(uri: str) -> np.ndarray:
    image = field.open_field(uri)
    return ome_zarr.read_region(image, 0, tuple(slice(0, n) for n in
                                                image.levels[0].grid.shape_zyx))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {
        "iso": synth.write_pair(str(root / "iso"), Grid((64, 64, 64), (1.0, 1.0, 1.0)),
                                seed=3, amplitude_voxels=2.0),
        "aniso": synth.write_pair(
            str(root / "aniso"),
            Grid((40, 58, 70), (1.0, 1.0, 2.0), (10.0, -20.0, 5.0), ROTATION_30),
            seed=5, amplitude_voxels=2.0),
        "small": synth.write_pair(str(root / "small"), Grid((48, 48, 48), (1.0, 1.0, 1.0)),
                                  seed=7, amplitude_voxels=1.5),
    }


@pytest.fixture(scope="module")
def iso_result(pairs, tmp_path_factory, dask_address):
    out = tmp_path_factory.mktemp("iso") / "out"
    return run(pairs["iso"], out, [bspline()], dask_address)


@pytest.fixture(scope="module")
def exact_small(pairs, tmp_path_factory, dask_address):
    """One registration of the small pair by the exact registrar, in batches of 3 blocks:
    the batches' test reads it; the tests that move or damage an output work on a copy."""
    out = tmp_path_factory.mktemp("exact") / "out"
    return run(pairs["small"], out, [exact()], dask_address, batch_size=3)


def test_bspline_blocks_recover_the_truth(pairs, iso_result):
    error = field_error(iso_result.field, pairs["iso"]["truth"])
    assert error["rms_after"] <= 0.25
    assert error["rms_after"] < 0.15 * error["rms_before"]
    assert iso_result.block_counts == {"bspline": {"ok": 8}}


def test_anisotropic_rotated_offset_pair(pairs, tmp_path, dask_address):
    result = run(pairs["aniso"], tmp_path / "out", [bspline()], dask_address)
    error = field_error(result.field, pairs["aniso"]["truth"])
    assert error["rms_after"] <= 0.25
    assert error["rms_after"] < 0.15 * error["rms_before"]
    check_border_like_interior(result.field)
    grid = field.open_field(result.field).levels[0].grid
    assert grid.direction == ROTATION_30
    assert grid.origin_xyz == (10.0, -20.0, 5.0)
    assert grid.spacing_xyz == (2.0, 2.0, 4.0)


def check_border_like_interior(field_uri: str) -> None:
    """Issue 20 item 1: the field's outermost layer (past the image's last voxel centre
    along axes whose size is not 1 + a multiple of the field factor) does not fold: its
    det J lies within the interior's range, widened by a tenth of that range."""
    image = field.open_field(field_uri)
    grid = image.levels[0].grid
    det = determinant(read_field(field_uri), grid)
    interior = det[1:-1, 1:-1, 1:-1]
    border = np.ones(det.shape, bool)
    border[1:-1, 1:-1, 1:-1] = False
    low, high = interior.min(), interior.max()
    slack = 0.1 * (high - low)
    assert det[border].min() >= low - slack, (det[border].min(), low)
    assert det[border].max() <= high + slack, (det[border].max(), high)
    assert det.min() > 0


def test_the_field_is_smooth_to_the_edges_of_its_grid(iso_result):
    # 64 voxels, field factor 2: the field's last voxel (j = 32) sits at index 64, one
    # voxel past the image, where no block registered anything.
    assert field.open_field(iso_result.field).levels[0].grid.shape_zyx == (33, 33, 33)
    check_border_like_interior(iso_result.field)


def test_field_is_continuous_across_block_borders(iso_result):
    """Differences of u across the blocks' overlap zones are no larger than inside the
    blocks: no seam. (The blend itself is checked exactly in test_reduce.py.)"""
    u = read_field(iso_result.field)
    # Field voxel j sits at fixed index 2j; the blocks' overlap zone is fixed 28..36.
    seam = np.zeros(u.shape[1] - 1, bool)
    seam[13:18] = True
    inside = np.zeros_like(seam)
    inside[3:11] = True
    inside[21:29] = True
    for axis in range(3):
        steps = np.linalg.norm(np.diff(u, axis=axis + 1), axis=0)
        steps = np.moveaxis(steps, axis, 0)[:, 2:-2, 2:-2]
        assert steps[seam].max() <= 1.2 * steps[inside].max(), f"seam along axis {axis}"


def test_affine_then_bspline_beats_either_alone(tmp_path, dask_address):
    pair = synth.write_pair(str(tmp_path / "pair"), Grid((64, 64, 80), (1.0, 1.0, 1.0)),
                            seed=11, amplitude_voxels=1.5, shift_voxels=(4.0, -5.0, 6.0))
    affine = StageConfig(name="affine", level=-1, transform="affine",
                         parameters={"MaximumNumberOfIterations": 200})
    fine = bspline(block_size=40)
    errors = {}
    for name, stages in {"affine": [affine], "bspline": [fine],
                         "both": [affine, fine]}.items():
        result = run(pair, tmp_path / name, stages, dask_address)
        # The shift (up to 6 voxels) maps the fixed image's outer band outside the moving
        # image, where nothing can be recovered: measure 8 voxels (4 field voxels) inside.
        errors[name] = field_error(result.field, pair["truth"], margin=4)["rms_after"]
    assert errors["both"] < errors["affine"]
    assert errors["both"] < errors["bspline"]
    assert errors["both"] <= 0.25


def test_rerun_reuses_stored_blocks_and_changes_invalidate(pairs, tmp_path, dask_address):
    pair = pairs["small"]
    out = tmp_path / "out"
    stages = [exact()]

    first = run(pair, out, stages, dask_address)
    assert first.blocks_reused == {"bspline": 0}
    first_field = read_field(first.field)

    second = run(pair, out, stages, dask_address, overwrite=True)
    assert second.blocks_reused == {"bspline": 8}
    assert second.block_counts == first.block_counts
    assert second.stages[0].block_seconds == 0  # no block computed in this run
    np.testing.assert_array_equal(read_field(second.field), first_field)
    # The same blocks give the same stage field, which is not rewritten.
    assert second.stages[0].field == first.stages[0].field

    changed = run(pair, out, [exact(iterations=31)], dask_address,
                  overwrite=True)
    assert changed.blocks_reused == {"bspline": 0}
    assert changed.stages[0].field != first.stages[0].field
    # Only the stage's current field is kept.
    assert [p.name for p in (out / "stages/1-bspline").glob("field-*")] == [
        Path(changed.stages[0].field).name]

    # New moving content under the same URI: every block runs again.
    moving = ome_zarr.open_image(pair["moving"])
    level0 = tuple(slice(0, n) for n in moving.levels[0].grid.shape_zyx)
    ome_zarr.write_region(moving, 0, level0, ome_zarr.read_region(moving, 0, level0) * 1.01)
    pyramid.build_pyramid(moving)
    rewritten = run(pair, out, [exact(iterations=31)], dask_address,
                    overwrite=True)
    assert rewritten.blocks_reused == {"bspline": 0}


def test_a_moved_output_keeps_its_stored_blocks(pairs, exact_small, tmp_path, dask_address):
    import shutil

    stages = [exact()]
    first = exact_small
    shutil.copytree(first.output, tmp_path / "out")
    shutil.move(tmp_path / "out", tmp_path / "moved")
    # The output copied from is out of the way while the moved one is used: nothing can
    # be read from it.
    aside = Path(first.output + "-aside")
    shutil.move(first.output, aside)
    try:
        again = run(pairs["small"], tmp_path / "moved", stages, dask_address, overwrite=True)
    finally:
        shutil.move(aside, first.output)
    assert again.blocks_reused == {"bspline": 8}
    np.testing.assert_array_equal(read_field(again.field), read_field(first.field))


def test_a_lost_or_damaged_residual_is_registered_again(pairs, exact_small, tmp_path,
                                                         dask_address):
    import shutil

    out = tmp_path / "out"
    stages = [exact()]
    first = exact_small
    shutil.copytree(first.output, out)
    residuals = sorted((out / "stages/1-bspline/blocks").glob("*.npy"))
    residuals[0].unlink()
    damaged = bytearray(residuals[1].read_bytes())
    damaged[-1] ^= 0xFF
    residuals[1].write_bytes(bytes(damaged))
    again = run(pairs["small"], out, stages, dask_address, overwrite=True)
    assert again.blocks_reused == {"bspline": 6}
    np.testing.assert_array_equal(read_field(again.field), read_field(first.field))


def test_refuses_to_overwrite_a_finished_result(pairs, iso_result):
    from dreg.errors import InputError
    from dreg.registration.pipeline import PipelineConfig
    from dreg.registration.plan import plan_registration

    with pytest.raises(InputError, match="already holds a finished registration"):
        plan_registration(pairs["iso"]["fixed"], pairs["iso"]["moving"], iso_result.output,
                          PipelineConfig(stages=[bspline()]))


def test_retries_and_failed_blocks(pairs, tmp_path, dask_client, dask_address):
    # Block 0-0-0 fails once (then succeeds on retry); block 1-1-1 always fails.
    spec = "0-0-0:1,1-1-1:99"
    dask_client.run(lambda: os.environ.__setitem__("DREG_FAULT_INJECT", spec))
    try:
        result = run(pairs["small"], tmp_path / "out", [exact()],
                     dask_address, batch_size=1, max_failed_share=0.2)
    finally:
        dask_client.run(lambda: os.environ.pop("DREG_FAULT_INJECT", None))
    assert result.block_counts == {"bspline": {"ok": 7, "failed": 1}}
    (stage,) = result.stages
    runs = {r.name: r for r in task_runs(stage.flow_run_id, "register-blocks")}
    assert len(runs) == 8
    assert runs["register-blocks-0-0-0"].run_count == 2
    assert runs["register-blocks-0-0-0"].state.name == "Completed"
    assert runs["register-blocks-1-1-1"].state.is_failed()

    table = json.loads((tmp_path / "out/stages/1-bspline/blocks.json").read_text())
    failed = [row for row in table if row["status"] == "failed"]
    assert [row["index"] for row in failed] == [[1, 1, 1]]
    assert "injected fault" in failed[0]["reason"]
    assert (tmp_path / "out/result.json").exists()
    assert result.failed_blocks == 1 and result.failed_share == 0.125
    # Where only the failed block reached, the field falls back to the previous stage
    # (the identity here): fixed voxels 27.. of each axis, field voxels 14...
    u = read_field(result.field)
    assert np.all(u[:, 14:, 14:, 14:] == 0)
    assert np.abs(u[:, :10, :10, :10]).max() > 0.1


def test_too_many_failed_blocks_fail_the_run(pairs, tmp_path, dask_client, dask_address):
    from dreg.errors import RunFailed

    dask_client.run(lambda: os.environ.__setitem__("DREG_FAULT_INJECT", "1-1-1:99"))
    try:
        with pytest.raises(RunFailed, match=r"1 of 8 blocks failed \(12.5%, more than the "
                                            r"5.0% allowed"):
            run(pairs["small"], tmp_path / "out", [exact()],
                dask_address, batch_size=1, block_retries=0)
    finally:
        dask_client.run(lambda: os.environ.pop("DREG_FAULT_INJECT", None))
    assert not (tmp_path / "out/result.json").exists()
    assert (tmp_path / "out/stages/1-bspline/blocks.json").exists()


def test_batches_count_blocks(exact_small):
    result = exact_small
    out = Path(result.output)
    (stage,) = result.stages
    names = sorted(r.name for r in task_runs(stage.flow_run_id, "register-blocks"))
    assert names == ["register-blocks-0-0-0-to-0-1-0", "register-blocks-0-1-1-to-1-0-1",
                     "register-blocks-1-1-0-to-1-1-1"]
    assert result.block_counts == {"bspline": {"ok": 8}}
    assert len(json.loads((out / "stages/1-bspline/blocks.json").read_text())) == 8


def test_link_artifact_opens_the_field(pairs, iso_result):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.artifacts import field_artifact_key

    key = field_artifact_key(iso_result.output)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
        summaries = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dreg-summary"])))
    assert found and summaries
    url = re.search(r"\((file://[^)]+)\)", found[0].data).group(1)
    image = field.open_field(url[len("file://"):])
    attrs = image.attributes
    assert attrs["kind"] == "displacement_field"
    assert attrs["mapping"] == "fixed_to_moving"
    assert attrs["components"] == ["z", "y", "x"]
    assert attrs["fixed"]["uri"] == pairs["iso"]["fixed"]
    assert attrs["moving"]["uri"] == pairs["iso"]["moving"]
    assert Grid.from_dict(attrs["grid"]) == image.levels[0].grid
    document = json.loads(Path(iso_result.output, "result.json").read_text())
    # issue 18 item 1: result.json names OUT's parts relative to OUT.
    assert storage.join(iso_result.output, document["field"]) == url[len("file://"):]
    assert document["field"] == "field.ome.zarr"
    assert document["flow_run_id"] == iso_result.flow_run_id


def test_a_last_stage_without_a_successful_block_fails_the_run(pairs, tmp_path, dask_client,
                                                              dask_address, prefect_api):
    from dreg.errors import RunFailed

    stage = StageConfig(name="whole", level=0, transform="translation", method=METHOD,
                        parameters={"MaximumNumberOfIterations": 10})
    dask_client.run(lambda: os.environ.__setitem__("DREG_FAULT_INJECT", "0-0-0:99"))
    try:
        with pytest.raises(RunFailed, match="stage whole: no block succeeded"):
            run(pairs["small"], tmp_path / "out", [stage], dask_address, block_retries=0)
    finally:
        dask_client.run(lambda: os.environ.pop("DREG_FAULT_INJECT", None))
    out = tmp_path / "out"
    assert not (out / "result.json").exists()
    # Kept for diagnosis: the stage's summary and block table.
    table = json.loads((out / "stages/1-whole/blocks.json").read_text())
    assert [row["status"] for row in table] == ["failed"]
    assert json.loads((out / "stages/1-whole/stage.json").read_text())["counts"] == {"failed": 1}
    # And announced: a dreg.registration.failed event with the reason.
    reasons = [e["payload"]["reason"] for e in wait_for_events(
        prefect_api, "dreg.registration.failed",
        lambda e: e["resource"]["prefect.resource.id"] == f"dreg.registration.{out}")]
    assert reasons and "no block succeeded" in reasons[0]

