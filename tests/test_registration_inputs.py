"""Bad input to a registration fails before any block runs, with a message naming it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dreg import synth
from dreg.errors import InputError, StorageError
from dreg.grid import Grid
from dreg.io import ome_zarr, storage
from dreg.registration import elastix
from dreg.registration.pipeline import PipelineConfig, StageConfig, load_pipeline, parse_pipeline
from dreg.registration.plan import plan_registration

BSPLINE = StageConfig(name="b", level=0, block_size=32, transform="bspline")


PAIR = {"grid": Grid((40, 40, 40), (1.0, 1.0, 1.0)), "seed": 1}


def plan(pair, out, *stages, moving=None):
    return plan_registration(pair["fixed"], moving or pair["moving"], str(out),
                             PipelineConfig(stages=list(stages or [BSPLINE])))


def test_a_valid_plan_lays_out_the_stages(pair, tmp_path):
    laid = plan(pair, tmp_path / "out")
    assert [s.folder for s in laid.stages] == [str(tmp_path / "out/stages/1-b")]
    assert laid.stages[0].field_grid.spacing_xyz == (2.0, 2.0, 2.0)


def test_images_that_do_not_overlap(pair, tmp_path):
    far = synth.write_pair(str(tmp_path / "far"),
                           Grid((40, 40, 40), (1.0, 1.0, 1.0), (500.0, 0.0, 0.0)), seed=1)
    with pytest.raises(InputError, match="do not overlap in physical space"):
        plan(pair, tmp_path / "out", moving=far["moving"])


def test_a_vector_image_as_moving(pair, tmp_path):
    with pytest.raises(InputError, match="needs a scalar 3D image"):
        plan(pair, tmp_path / "out", moving=pair["truth"])


def test_a_2d_image(pair, tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "flat.ome.zarr"), mode="w", zarr_format=3)
    group.create_array("0", shape=(32, 32), dtype="float32")
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0]}]}]}]}
    with pytest.raises(InputError, match="needs a 3D image"):
        plan(pair, tmp_path / "out", moving=str(tmp_path / "flat.ome.zarr"))


def test_a_level_that_does_not_exist(pair, tmp_path):
    stage = StageConfig(name="b", level=3, transform="affine")
    with pytest.raises(InputError, match="level 3 does not exist"):
        plan(pair, tmp_path / "out", stage)


def test_block_too_small_for_the_bspline_grid(pair, tmp_path):
    stage = StageConfig(name="b", level=0, block_size=16, transform="bspline")
    with pytest.raises(InputError, match="too small for a B-spline grid spacing of 8"):
        plan(pair, tmp_path / "out", stage)


@pytest.mark.parametrize("stage, message", [
    ({"name": "a", "overlap": 1.0}, "stages.0.overlap"),
    ({"name": "a", "overlap": -0.1}, "stages.0.overlap"),
    ({"name": "a", "block_size": 4}, "block_size must be at least 8"),
    ({"name": "a", "transform": "demons"}, "'demons'"),
    ({"name": "a", "blocksize": 32}, "stages.0.blocksize"),
    ({"name": "a/b"}, "stages.0.name"),
])
def test_bad_stage_values_are_named(stage, message):
    with pytest.raises(InputError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_pipeline({"stages": [stage]})


def test_pipeline_yaml(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "stages:\n"
        "  - {name: coarse, level: -1, transform: affine}\n"
        "  - name: fine\n    level: 0\n    block_size: [32, 48, 48]\n    overlap: 0.3\n"
        "    transform: bspline\n    parameters: {MaximumNumberOfIterations: 50,"
        " FinalGridSpacingInVoxels: [6, 6, 6]}\n"
        "    field_grid_factor: 4\n    foreground_threshold: 0.2\n    metric_guard: false\n")
    loaded = load_pipeline(path)
    assert [s.name for s in loaded.stages] == ["coarse", "fine"]
    assert loaded.stages[1].block_size == (32, 48, 48)
    assert loaded.stages[1].parameters["FinalGridSpacingInVoxels"] == [6, 6, 6]
    path.write_text("stages:\n  - {name: a, colour: red}\n")
    with pytest.raises(InputError, match=r"pipeline.yaml: stages\.0\.colour"):
        load_pipeline(path)


@pytest.mark.elastix
def test_elastix_rejects_a_parameter():
    pmap = elastix.parameter_map("bspline", {"Metric": "NoSuchMetric"})
    with pytest.raises(InputError, match="^stage b: parameter Metric: elastix rejected it: "
                       "The following component could not be created: NoSuchMetric$"):
        elastix.check_parameter_map(pmap, "stage b")


def test_an_unknown_preset():
    with pytest.raises(InputError, match="unknown transform preset 'demons'"):
        elastix.parameter_map("demons")


def test_an_output_that_is_not_writable(pair, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="not writable"):
        plan(pair, blocker / "out")


@pytest.mark.full  # runs dreg as a process
def test_cli_reports_bad_input_in_one_line_before_any_work(pair, tmp_path):
    far = synth.write_pair(str(tmp_path / "far"),
                           Grid((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 900.0, 0.0)), seed=2)
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "register", pair["fixed"], far["moving"],
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "do not overlap in physical space" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    assert ome_zarr.open_image(pair["fixed"])  # inputs untouched


def test_a_whole_image_stage_on_a_large_level_is_refused(tmp_path):
    from dreg.registration import plan as plan_module

    big = Grid((300, 300, 300), (1.0, 1.0, 1.0))
    stage = StageConfig(name="global", level=0, transform="affine")
    with pytest.raises(InputError, match="stage global: the whole level at level 0"):
        plan_module._check_block_size(stage, big)
    plan_module._check_block_size(stage.model_copy(update={"block_size": 128}), big)


@pytest.mark.elastix
def test_bspline_grid_spacing_without_loading_elastix():
    assert elastix.bspline_grid_spacing_voxels({}) == 8
    assert elastix.bspline_grid_spacing_voxels({"FinalGridSpacingInVoxels": [4, 6, 6]}) == 6
    assert elastix.bspline_grid_spacing_voxels({"FinalGridSpacingInPhysicalUnits": 10}) is None
    default = elastix.parameter_map("bspline")
    assert default["FinalGridSpacingInVoxels"] == ["8"]


# ----------------------------------------------------------------------------- OUT and inputs


def register_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "register", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture
def register_here(monkeypatch, capfd):
    """`dreg register ARGS` as a call of the entry point in this process (in `cwd`):
    its exit status and what it printed, as register_cli gives them. The refusals below
    come from the CLI's checks; a process each would only add an interpreter start."""
    from cli.main import main

    def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
        with monkeypatch.context() as patch:
            if cwd is not None:
                patch.chdir(cwd)
            capfd.readouterr()
            try:
                status = main(["register", *args])
            except SystemExit as exc:  # argparse's own errors
                status = exc.code
            printed = capfd.readouterr()
        return subprocess.CompletedProcess(["dreg", "register", *args], status,
                                           printed.out, printed.err)
    return run


def assert_refused(done: subprocess.CompletedProcess, *named: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1 and lines[0].startswith("dreg: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def listing(folder) -> list[str]:
    from pathlib import Path

    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def test_an_output_in_or_over_an_input_is_refused_naming_both(tmp_path, register_here):
    """OUT inside FIXED or MOVING, OUT equal to one however spelled (relative, `..`,
    trailing slash), and an input inside OUT: exit 2, one line naming both, nothing
    written anywhere."""
    from pathlib import Path

    pair = synth.write_pair(str(tmp_path / "pair"), Grid((24, 24, 24), (1.0, 1.0, 1.0)),
                            seed=1, chunks=16)
    fixed, moving = Path(pair["fixed"]), Path(pair["moving"])
    before = listing(tmp_path)
    cases = [
        (str(fixed / "out"), "is inside FIXED", str(fixed)),
        ("pair/fixed.ome.zarr/nested/../out/", "is inside FIXED", str(fixed)),
        ("./pair/moving.ome.zarr/", "is MOVING", str(moving)),
        ("pair/fixed.ome.zarr/../moving.ome.zarr", "is MOVING", str(moving)),
        (str(tmp_path / "pair"), "is inside OUT", str(fixed)),
    ]
    for out, relation, named in cases:
        done = register_here(str(fixed), str(moving), out, cwd=tmp_path)
        assert_refused(done, relation, named, str((tmp_path / out).resolve()))
    assert listing(tmp_path) == before


@pytest.mark.s3
def test_an_output_in_an_input_on_s3_is_refused(s3, register_here):
    import uuid

    root = s3.uri(uuid.uuid4().hex)
    pair = synth.write_pair(storage.join(root, "pair"), Grid((24, 24, 24), (1.0, 1.0, 1.0)),
                            seed=1, chunks=16)
    fs, _ = storage.filesystem(root)
    before = sorted(fs.find(root.removeprefix("s3://")))
    for out, relation in ((pair["fixed"] + "//out/", "is inside FIXED"),
                          (pair["fixed"] + "/../moving.ome.zarr/", "is MOVING"),
                          (root, "is inside OUT")):
        done = register_here(pair["fixed"], pair["moving"], out)
        assert_refused(done, relation)
    fs.invalidate_cache()
    assert sorted(fs.find(root.removeprefix("s3://"))) == before


# ----------------------------------------------------------------------------- elastix parameters


@pytest.mark.parametrize("transform, overrides, message", [
    ("bspline", {"NumberOfResolutions": 0},
     "parameter NumberOfResolutions must be a positive whole number, got '0'"),
    ("affine", {"NumberOfResolutions": "two"},
     "parameter NumberOfResolutions must be a positive whole number, got 'two'"),
    ("affine", {"MaximumNumberOfIterations": 0},
     "parameter MaximumNumberOfIterations must be a positive whole number, got '0'"),
    ("affine", {"MaximumNumberOfIterations": [100, 50, 25]},
     "parameter MaximumNumberOfIterations needs 1 value, or 1 per resolution (2), got 3"),
    ("affine", {"NumberOfSpatialSamples": -5},
     "parameter NumberOfSpatialSamples must be a positive whole number, got '-5'"),
    ("affine", {"NumberOfResolutions": 3, "ImagePyramidSchedule": [4, 4, 4, 2, 2, 2]},
     "parameter ImagePyramidSchedule needs 3 × NumberOfResolutions = 9 values"),
    ("affine", {"ImagePyramidSchedule": [4, 4, -4, 1, 1, 1]},
     "parameter ImagePyramidSchedule must be a non-negative number, got '-4'"),
    ("bspline", {"FinalGridSpacingInVoxels": -8},
     "parameter FinalGridSpacingInVoxels must be a positive number, got '-8'"),
    ("bspline", {"FinalGridSpacingInPhysicalUnits": [4, 4]},
     "parameter FinalGridSpacingInPhysicalUnits needs 1 value, or 3 (one per axis), got 2"),
    ("bspline", {"GridSpacingSchedule": [4, 2, 1]},
     "parameter GridSpacingSchedule needs 2 values (one per resolution) or 6"),
    ("affine", {"Metric": "AdvancedMatesMutualInformation"},
     "parameter Metric: 'AdvancedMatesMutualInformation' is not an elastix Metric component; "
     "did you mean AdvancedMattesMutualInformation?"),
    ("affine", {"Metric": "PCAMetric"},
     "parameter Metric: 'PCAMetric' needs a 4D stack of images (groupwise)"),
    ("affine", {"Optimizer": "Adam"}, "parameter Optimizer: 'Adam' is not an elastix Optimizer"),
    ("rigid", {"Transform": "RigidTransform"},
     "parameter Transform: 'RigidTransform' is not an elastix Transform component"),
    ("affine", {"Interpolator": "CubicInterpolator"}, "parameter Interpolator: 'Cubic"),
    ("affine", {"Registration": "Registration"}, "parameter Registration: 'Registration' is"),
    ("bspline", {"Registration": "MultiResolutionRegistration",
                 "Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"]},
     "parameter Registration MultiResolutionRegistration uses one metric, but Metric has 2"),
    # The B-spline preset has one metric (Mattes MI, without elastix's default penalty):
    # a weight for a second metric needs the Metric that names it.
    ("bspline", {"Metric1Weight": 0.5},
     "parameter Metric1Weight refers to metric 1, but Metric has 1"),
    ("affine", {"AutomaticScalesEstimation": "yes"},
     "parameter AutomaticScalesEstimation must be true or false, got 'yes'"),
    ("affine", {"FinalBSplineInterpolationOrder": 7},
     "parameter FinalBSplineInterpolationOrder must be a whole number from 0 to 5, got '7'"),
    ("bspline", {"Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"],
                 "Metric2Weight": 0.5},
     "parameter Metric2Weight refers to metric 2, but Metric has 2"),
    ("affine", {"ResultImagePixelType": "float16"}, "parameter ResultImagePixelType must be"),
    ("affine", {"MaximumNumberOfIteration": 100},
     "parameter MaximumNumberOfIteration is not an elastix parameter (elastix would ignore it);"
     " did you mean MaximumNumberOfIterations?"),
    ("affine", {"numberofspatialsamples": 100},
     "parameter numberofspatialsamples is not an elastix parameter"),
])
def test_parameter_values_elastix_cannot_use_are_named(pair, tmp_path, transform, overrides,
                                                       message):
    stage = StageConfig(name="s", level=0, block_size=32, transform=transform,
                        parameters=overrides)
    with pytest.raises(InputError) as caught:
        plan(pair, tmp_path / "out", stage)
    assert str(caught.value).startswith(f"stage s: {message}"), str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("transform, overrides", [
    ("affine", {"NumberOfResolutions": 3, "MaximumNumberOfIterations": [300, 200, 100],
                "ImagePyramidSchedule": [4, 4, 4, 2, 2, 1, 1, 1, 1]}),
    ("bspline", {"FinalGridSpacingInVoxels": [6, 8, 8], "GridSpacingSchedule": [2.0, 1.0],
                 "Metric": ["AdvancedMeanSquares", "TransformBendingEnergyPenalty"],
                 "Metric1Weight": [0.1, 0.5], "AutomaticParameterEstimation": True}),
    # elastix's default B-spline penalty, given back by the user, weighted.
    ("bspline", {"Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"],
                 "Metric1Weight": 0.01}),
    ("bspline", {"Registration": "MultiResolutionRegistration"}),
    ("rigid", {"Transform": "SimilarityTransform", "Optimizer": "RegularStepGradientDescent",
               "MinimumStepLength": 0.01, "NumberOfSpatialSamples": 4096}),
])
def test_parameter_values_elastix_can_use_pass(pair, tmp_path, transform, overrides):
    plan(pair, tmp_path / "out", StageConfig(name="s", level=0, block_size=32,
                                              transform=transform, parameters=overrides))


@pytest.mark.elastix
@pytest.mark.parametrize("preset", elastix.PRESETS)
def test_elastix_own_default_maps_pass_the_check(preset):
    """Every value of elastix's default maps (as this project sets them) is one the check
    accepts: it refuses only what elastix cannot use."""
    from dreg.registration.parameters import check_parameters

    for resolutions in (1, 3):
        pmap = elastix.parameter_map(preset, {"NumberOfResolutions": resolutions})
        check_parameters(preset, pmap, "s")


@pytest.mark.elastix
def test_the_bspline_preset_is_mattes_mi_alone_and_its_penalty_can_be_given_back():
    """The preset drops elastix's default TransformBendingEnergyPenalty (bench/README.md,
    "Per-block cost"); a user names it again with Metric and weighs it."""
    preset = elastix.parameter_map("bspline")
    assert preset["Metric"] == ["AdvancedMattesMutualInformation"]
    assert "Metric1Weight" not in preset
    given_back = elastix.parameter_map("bspline", {
        "Metric": ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"],
        "Metric1Weight": 0.01})
    assert given_back["Metric"][1] == "TransformBendingEnergyPenalty"
    assert given_back["Metric1Weight"] == ["0.01"]


@pytest.mark.elastix
def test_the_result_image_is_the_moving_image_through_the_found_transform():
    """register() resamples the moving image itself (elastix writes no result image):
    on a pair one voxel apart, the transform found is that shift and the result matches
    the fixed image far better than the moving image does."""
    fixed, moving, grid = elastix._tiny_pair(24)
    pmap = elastix.parameter_map("translation", {"NumberOfResolutions": 1})
    result = elastix.register(fixed, moving, grid, pmap)
    assert result.result_image.shape == fixed.shape
    assert np.abs(result.result_image - fixed)[4:-4, 4:-4, 4:-4].max() < \
        0.1 * np.abs(moving - fixed)[4:-4, 4:-4, 4:-4].max()
    # moving(x) = fixed(x + 1 along x), so fixed(x) = moving(x - 1): T(x) = x - (1, 0, 0).
    shift = np.array(result.transform.TransformPoint((0.0, 0.0, 0.0)))  # x, y, z
    assert np.allclose(shift, (-1.0, 0.0, 0.0), atol=0.05), shift


@pytest.mark.elastix
def test_the_worker_check_names_what_only_elastix_knows():
    """A misspelt name elastix ignores, and a component combination it refuses."""
    misspelt = elastix.parameter_map("affine", {"NumberOfSamplesPerBlock": 10})
    with pytest.raises(InputError, match="^stage a: parameter NumberOfSamplesPerBlock is not "
                       "used by elastix"):
        elastix.check_parameter_map(misspelt, "stage a")
    boolean = elastix.parameter_map("affine", {"AutomaticScalesEstimation": "yes"})
    with pytest.raises(InputError, match="^stage a: parameter AutomaticScalesEstimation: "
                       "elastix rejected it: Entry number 0 for the parameter"):
        elastix.check_parameter_map(boolean, "stage a")
    rigidity = elastix.parameter_map("affine", {"Metric": "TransformRigidityPenalty"})
    with pytest.raises(InputError, match="^stage a: elastix rejected the parameters: this "
                       "metric expects a B-spline transform"):
        elastix.check_parameter_map(rigidity, "stage a")
    for preset in elastix.PRESETS:  # elastix's own maps use every parameter they hold
        elastix.check_parameter_map(elastix.parameter_map(preset), f"stage {preset}")
    # Schedules for three resolutions pass the one-resolution trial.
    elastix.check_parameter_map(elastix.parameter_map("bspline", {
        "NumberOfResolutions": 3, "GridSpacingSchedule": [4, 2, 1],
        "ImagePyramidSchedule": [4, 4, 4, 2, 2, 2, 1, 1, 1]}), "stage b")


@pytest.mark.parametrize("parameters, named, mode", [
    pytest.param("{NumberOfResolutions: 0}",
                 "parameter NumberOfResolutions must be a positive whole", "process",
                 marks=pytest.mark.full),  # runs dreg as a process
    ("{MaximumNumberOfIterations: [100, 50, 25]}", "parameter MaximumNumberOfIterations needs",
     "in-process"),
    ("{Metric: NoSuchMetric}", "parameter Metric: 'NoSuchMetric' is not an elastix Metric",
     "in-process"),
])
def test_cli_refuses_a_bad_parameter_in_seconds(pair, tmp_path, parameters, named, mode,
                                                register_here):
    import json
    import time

    config = tmp_path / "pipeline.yaml"
    config.write_text("stages:\n  - {name: fine, level: 0, block_size: 32, transform: bspline,"
                      f" parameters: {parameters}}}\n")
    started = time.monotonic()
    command = register_cli if mode == "process" else register_here
    done = command(pair["fixed"], pair["moving"], str(tmp_path / "out"), "--config",
                   str(config))
    seconds = time.monotonic() - started
    assert_refused(done, f"dreg: error: stage fine: {named}")
    assert not (tmp_path / "out").exists()
    print(json.dumps({"refused_in_s": round(seconds, 2), "parameters": parameters}))


@pytest.fixture(scope="module")
def pyramid_pair(tmp_path_factory):
    """A pair with two levels (the longest axis over pyramid.COARSEST_LONGEST_AXIS)."""
    return synth.write_pair(str(tmp_path_factory.mktemp("p") / "pair"),
                            Grid((24, 32, 80), (1.0, 1.0, 1.0)), seed=1)


class CountedListings:
    """Counts the chunk listings of the fingerprints (one per level of an image)."""

    def __init__(self, monkeypatch):
        from dreg.io.ome_zarr import fingerprints

        self.paths: list[str] = []
        listing = fingerprints._listing

        def counted(image, fs, path):
            self.paths.append(path)
            return listing(image, fs, path)

        monkeypatch.setattr(fingerprints, "_listing", counted)

    def take(self) -> list[str]:
        taken, self.paths = self.paths, []
        return taken


def test_a_registration_lists_each_level_of_each_input_once_at_its_start_and_once_at_its_end(
        pyramid_pair, tmp_path, monkeypatch):
    """The steps of `dreg register` without the flow around them: the CLI's check, the
    run's plan, every stage's context, the final check."""
    from dreg.registration.plan import check_inputs_unchanged, stage_context

    pair = pyramid_pair
    listings = CountedListings(monkeypatch)
    levels = {role: len(ome_zarr.open_image(pair[role]).levels) for role in ("fixed", "moving")}
    assert levels == {"fixed": 2, "moving": 2}
    stages = [StageConfig(name="a", level=-1, transform="affine"), BSPLINE]
    pipeline = PipelineConfig(stages=stages)

    checked = plan_registration(pair["fixed"], pair["moving"], str(tmp_path / "out"), pipeline,
                                versions=False)
    assert listings.take() == []
    assert checked.input_versions == {} and checked.level_versions == {}
    with pytest.raises(ValueError, match="cannot run"):
        stage_context(checked, checked.stages[0], None, "")

    planned = plan_registration(pair["fixed"], pair["moving"], str(tmp_path / "out"), pipeline)
    listed = listings.take()
    assert len(listed) == len(set(listed)) == levels["fixed"] + levels["moving"]
    for stage in planned.stages:
        stage_context(planned, stage, None, "")
    assert listings.take() == []
    check_inputs_unchanged(planned)
    assert sorted(listings.take()) == sorted(listed)


def test_the_planned_versions_are_the_fingerprints_of_the_images_and_their_levels(
        pyramid_pair, tmp_path):
    from dreg.registration.plan import stage_context

    pair = pyramid_pair
    planned = plan(pair, tmp_path / "out", StageConfig(name="a", level=-1, transform="affine"))
    for role in ("fixed", "moving"):
        image = ome_zarr.open_image(pair[role])
        assert planned.input_versions[role] == ome_zarr.fingerprint(image)
        assert planned.level_versions[role] == tuple(
            ome_zarr.fingerprint(image, [k]) for k in range(len(image.levels)))
    ctx = stage_context(planned, planned.stages[0], None, "")
    assert ctx.fixed_version == planned.level_versions["fixed"][planned.stages[0].level]
    assert ctx.moving_version == planned.level_versions["moving"][planned.stages[0].level]


def test_the_cli_checks_a_registration_without_listing_a_chunk(pair, tmp_path, monkeypatch):
    """`dreg register` validates before a server or cluster starts, listing nothing: the
    flow fingerprints the inputs where the run starts."""
    from cli import main, register

    listings = CountedListings(monkeypatch)
    listed_before_the_run = []

    def run(args, pipeline, warp=False):
        listed_before_the_run.extend(listings.take())
        raise InputError("the flow is not run here")

    monkeypatch.setattr(register, "_run_registration", run)
    assert main.main(["register", pair["fixed"], pair["moving"], str(tmp_path / "out")]) == 2
    assert listed_before_the_run == []


def test_the_cli_still_refuses_bad_input_before_the_run(pair, tmp_path, monkeypatch):
    from cli import main, register

    monkeypatch.setattr(register, "_run_registration", lambda *a, **k: pytest.fail("ran"))
    assert main.main(["register", pair["fixed"], pair["truth"], str(tmp_path / "out")]) == 2
