"""The block-registration seam (dreg.registration.method) and the exact registrar that
tests use in its place: no elastix, no Prefect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from exact_registrar import METHOD

from dreg import synth
from dreg.errors import InputError
from dreg.field import AffineTransform
from dreg.grid import Grid
from dreg.registration import PipelineConfig, StageConfig
from dreg.registration.block import register_block
from dreg.registration.method import BlockMethod, check_built_in, resolve
from dreg.registration.outcome import OK
from dreg.registration.plan import plan_registration, stage_context
from dreg.registration.tiling import tile


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    return synth.write_pair(str(tmp_path_factory.mktemp("pair")),
                            Grid((32, 32, 32), (1.0, 1.0, 1.0)), seed=4, amplitude_voxels=1.5)


def test_elastix_is_the_default_and_a_block_method():
    assert StageConfig(name="s").method == "elastix"
    method = resolve("elastix")
    assert isinstance(method, BlockMethod)
    assert method.name == "elastix" and method.version()


@pytest.mark.parametrize("name", ["os.system('x')", "a b:c", "module", ":attr", ""])
def test_a_method_is_a_built_in_name_or_an_import_path(name):
    from dreg.registration.pipeline import parse_pipeline

    with pytest.raises(InputError, match="stages.0.method: Value error, method must be one"):
        parse_pipeline({"stages": [{"name": "s", "method": name}]})


def test_a_method_that_cannot_be_loaded_is_named():
    with pytest.raises(InputError, match="no_such_module:Method"):
        resolve("no_such_module:Method")
    with pytest.raises(InputError, match="does not provide"):
        resolve("dreg.errors:first_line")


def test_untrusted_pipelines_get_built_in_methods_only():
    check_built_in(["elastix"], "pipeline")
    with pytest.raises(InputError, match=r"pipeline: method 'exact_registrar:ExactRegistrar' "
                                         r"is not allowed here \(only elastix\)"):
        check_built_in(["elastix", METHOD], "pipeline")


def test_the_method_is_part_of_the_block_key(small_pair, tmp_path):
    stages = [StageConfig(name="s", block_size=16, transform="translation"),
              StageConfig(name="t", block_size=16, transform="translation", method=METHOD)]
    plan = plan_registration(small_pair["fixed"], small_pair["moving"], str(tmp_path / "o"),
                             PipelineConfig(stages=stages))
    keys = [stage_context(plan, stage, None, "").key_inputs() for stage in plan.stages]
    assert keys[0].method["name"] == "elastix" and keys[1].method["name"] == METHOD
    assert keys[1].method["version"] == "1"
    assert keys[0].grids == keys[1].grids and keys[0].method != keys[1].method


def test_blocks_of_64_or_more_get_the_coarser_bspline_grid(small_pair, tmp_path):
    """Planning makes elastix's block-size-dependent default explicit: a B-spline stage
    that sets no grid spacing gets 16 voxels where its blocks are at least 64 per axis,
    and keeps the preset's 8 (nothing added) below; a spacing the stage sets is kept."""
    from dreg.registration.pipeline import default_pipeline

    large = synth.write_pair(str(tmp_path / "large"), Grid((64, 70, 80), (1.0, 1.0, 1.0)),
                             seed=4, amplitude_voxels=1.5)

    def planned(pair, pipeline):
        plan = plan_registration(pair["fixed"], pair["moving"], str(tmp_path / "o"),
                                 pipeline, versions=False)
        return [stage.config.parameters for stage in plan.stages]

    assert planned(large, default_pipeline()) == [{}, {"FinalGridSpacingInVoxels": 16}]
    assert planned(small_pair, default_pipeline()) == [{}, {}]
    chosen = [StageConfig(name="b", block_size=64, parameters={"FinalGridSpacingInVoxels": 8}),
              StageConfig(name="p", block_size=64,
                          parameters={"FinalGridSpacingInPhysicalUnits": 12.0}),
              StageConfig(name="x", block_size=64, method=METHOD)]
    assert planned(large, PipelineConfig(stages=chosen)) == [
        {"FinalGridSpacingInVoxels": 8}, {"FinalGridSpacingInPhysicalUnits": 12.0}, {}]


def test_the_built_in_pipeline_takes_larger_blocks_past_512_blocks_of_64():
    """Blocks of 64 up to 512 of them at level 0 (8 per axis: a 512^3 image, with the
    tiling's remainder rule), then 128; a shape unknown gets 64."""
    from dreg.registration.pipeline import default_block_edge, default_pipeline

    for shape, edge in [((128, 128, 128), 64), ((512, 512, 512), 64), ((540, 540, 540), 64),
                        ((600, 600, 600), 128), ((1024, 1024, 1024), 128),
                        ((300, 2048, 2048), 128), ((64, 4096, 4096), 128), (None, 64)]:
        assert default_block_edge(shape) == edge, shape
        assert default_pipeline(shape).stages[1].block_size == edge


def test_a_plan_without_a_pipeline_takes_the_built_in_one_for_the_fixed_size(tmp_path):
    """Planning with no pipeline sizes the built-in one's blocks by the fixed image's
    level 0 (its arrays are created, never written: a plan reads only the coarsest)."""
    from dreg.io import ome_zarr
    from dreg.registration.pipeline import default_pipeline

    def pair(shape):
        levels = [Grid(shape, (1.0, 1.0, 1.0))]
        levels.append(levels[0].coarsened(16.0))
        uris = [str(tmp_path / f"{shape[0]}-{name}.ome.zarr") for name in ("f", "m")]
        for uri in uris:
            ome_zarr.create_image(uri, levels, "uint16", chunks=64, fill_value=7)
        return uris

    for shape, edge in [((600, 600, 600), 128), ((96, 96, 96), 64)]:
        fixed, moving = pair(shape)
        plan = plan_registration(fixed, moving, str(tmp_path / f"out{shape[0]}"),
                                 versions=False)
        assert [s.config.block_size for s in plan.stages] == [None, edge]
        assert plan.stages[1].config.block_size == default_pipeline(shape).stages[1].block_size


def test_a_finished_result_is_found_again_for_its_pipeline_as_requested(tmp_path):
    """A repeated request finds the finished result although the result records its
    stages as planned (the B-spline grid made explicit); with no pipeline, the built-in
    one counts as requested. Another pipeline, or changed content, finds nothing."""
    from dreg.io import completion
    from dreg.registration.pipeline import default_pipeline
    from dreg.registration.records import finished_with_same_inputs, registration_result

    pair = synth.write_pair(str(tmp_path / "pair"), Grid((64, 70, 80), (1.0, 1.0, 1.0)),
                            seed=4, amplitude_voxels=1.5)
    out = str(tmp_path / "out")
    plan = plan_registration(pair["fixed"], pair["moving"], out)
    assert plan.stages[1].config != default_pipeline().stages[1]  # made explicit
    completion.write_whole(plan.result_uri, registration_result(plan, [], "run", 1.0).document())

    def found(pipeline):
        return finished_with_same_inputs(out, pair["fixed"], pair["moving"], pipeline)

    assert found(None) is not None
    assert found(default_pipeline((64, 70, 80))) is not None
    other = default_pipeline().model_copy(deep=True)
    other.stages[1].overlap = 0.5
    assert found(other) is None
    synth.write_pair(str(tmp_path / "pair"), Grid((64, 70, 80), (1.0, 1.0, 1.0)), seed=5,
                     amplitude_voxels=1.5, overwrite=True)
    assert found(None) is None


def exact_block_residual(pair: dict, out: Path, previous):
    """Every block of a one-stage plan registered by the exact registrar from
    `previous`: the residuals and the truth and previous sampled on the field grid."""
    stage = StageConfig(name="s", block_size=16, method=METHOD)
    plan = plan_registration(pair["fixed"], pair["moving"], str(out),
                             PipelineConfig(stages=[stage]), initial=previous)
    (stage_plan,) = plan.stages
    ctx = stage_context(plan, stage_plan, None, "")
    blocks = tile(stage_plan.fixed_grid.shape_zyx, 16, 0.25, stage_plan.field_grid.shape_zyx,
                  2.0)
    return ctx, stage_plan, blocks


def test_the_exact_registrar_maps_each_block_exactly(small_pair, tmp_path):
    from exact_registrar import residual_on, truth_uri

    from dreg.field import as_transform, displacement_of
    from dreg.grid import components_to_vectors, whole_region

    shift = AffineTransform(translation=(0.5, -0.25, 0.3))
    ctx, stage, blocks = exact_block_residual(small_pair, tmp_path / "out", shift)
    truth = as_transform(truth_uri(small_pair["fixed"]))
    assert truth_uri(small_pair["fixed"]) == small_pair["truth"]
    for block in blocks:
        result, residual = register_block(ctx, block)
        assert result.status == OK, result.reason
        assert result.metric_after > result.metric_before
        grid = stage.field_grid.subgrid(block.field_box)
        np.testing.assert_array_equal(residual, residual_on(grid, truth, shift))
        # Composed with the previous transform, the residual is the truth.
        points = grid.region_points(whole_region(grid.shape_zyx))
        r = components_to_vectors(residual)
        total = r + displacement_of(shift, points + r)
        np.testing.assert_allclose(total, displacement_of(truth, points), atol=1e-4)


def test_a_pair_without_truth_fails_its_blocks(small_pair, tmp_path):
    import shutil

    copy = tmp_path / "pair"
    shutil.copytree(Path(small_pair["fixed"]).parent, copy)
    shutil.rmtree(copy / "truth.ome.zarr")
    pair = {role: str(copy / f"{role}.ome.zarr") for role in ("fixed", "moving")}
    ctx, _, blocks = exact_block_residual(pair, tmp_path / "out", None)
    result, residual = register_block(ctx, blocks[0])
    assert (result.status, residual) == ("failed", None)
    assert result.reason.startswith("exact: no truth field next to the fixed image")


def test_elastix_residuals_hold_their_last_value_past_the_block():
    """Issue 20 item 1: field voxels past the block's last voxel centre take the value of
    the last one before it (elastix's B-spline is zero past its image, so the field's
    outer layer fell back to the previous stage and folded). A plain function: no
    elastix runs here."""
    from dreg.registration.elastix import hold_past_block

    rotation = ((0.8660254037844387, -0.5, 0.0), (0.5, 0.8660254037844387, 0.0),
                (0.0, 0.0, 1.0))
    # A border block of 9 x 10 x 12 voxels, anisotropic and rotated, and its share of a
    # field grid at factor 2: field voxel j sits at block index 2j, so along z (9
    # voxels) and y (10) the last field voxel is inside or on the last centre, along x
    # (12 voxels) j = 6 sits at index 12, past the last centre (11).
    block_grid = Grid((9, 10, 12), (0.5, 1.0, 2.0), (3.0, -1.0, 2.0), rotation)
    field_grid = block_grid.coarsened(2.0, (5, 5, 7))
    residual = np.random.default_rng(0).normal(size=(3, 5, 5, 7)).astype(np.float32)
    held = hold_past_block(residual.copy(), field_grid, block_grid)
    np.testing.assert_array_equal(held[..., :6], residual[..., :6])
    np.testing.assert_array_equal(held[..., 6], residual[..., 5])
    # A field share that ends inside the block is left as it is.
    inner = residual[..., :5]
    assert np.array_equal(hold_past_block(inner.copy(), block_grid.coarsened(2.0, (5, 5, 5)),
                                          block_grid), inner)
