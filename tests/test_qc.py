"""Quality control: det J against analytic fields, the similarity verdict, the pictures
and the page, in one process (the core), then through the flows: on S3, with a warped
image, and at the end of a real registration seen in the Prefect UI in Chromium."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from chromium import CHROMIUM, LOADED_IMAGES, browser
from exact_registrar import METHOD
from helpers import finished_registration
from matplotlib import image as mpimage

from dreg import synth
from dreg.field import create_field, fixed_description
from dreg.grid import Grid, components_to_vectors, vectors_to_components, whole_region
from dreg.io import ome_zarr, storage
from dreg.qc import check, slices
from dreg.qc.jacobian import JacobianTally, region_determinant
from dreg.qc.plan import plan_qc
from dreg.registration.records import load_result
from flows.options import RunOptions

ROTATION = ((0.8660254037844387, -0.5, 0.0), (0.5, 0.8660254037844387, 0.0), (0.0, 0.0, 1.0))
AFFINE = np.array([[1.08, 0.12, -0.05], [-0.07, 0.93, 0.1], [0.04, -0.06, 1.15]])
PICTURES = {"fixed", "moving_before", "moving_after", "checkerboard_before",
            "checkerboard_after", "deformation_grid", "displacement", "jacobian", "blocks",
            "metric_gain"}
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


def with_field(pair: dict, out: Path, grid: Grid, u_xyz: np.ndarray, chunks: int = 8) -> str:
    """A finished registration in OUT whose field is `u_xyz` (world vectors on `grid`)."""
    out = finished_registration(pair, str(out))
    shutil.rmtree(Path(out, "field.ome.zarr"))
    image = create_field(storage.join(out, "field.ome.zarr"), grid,
                         fixed=fixed_description(ome_zarr.open_image(pair["fixed"])),
                         moving_uri=pair["moving"], chunks=chunks)
    ome_zarr.write_region(image, 0, whole_region(grid.shape_zyx), vectors_to_components(u_xyz))
    return out


def chunked_tally(field_uri: str, chunk: int) -> JacobianTally:
    image = ome_zarr.open_image(field_uri)
    tally = JacobianTally()
    for region in ome_zarr.chunk_regions(image.levels[0].grid.shape_zyx, (chunk,) * 3):
        tally = tally.merge(JacobianTally.of(region_determinant(image, region)[0]))
    return tally


def test_an_affine_field_has_exactly_the_affines_determinant(tmp_path):
    """x ↦ A x + t on a rotated, anisotropic, offset grid: det J is det A at every voxel,
    across chunk borders and at the field's border, through the whole QC."""
    grid = Grid((24, 26, 28), (0.8, 1.3, 2.1), origin_xyz=(10.0, -20.0, 5.0),
                direction=ROTATION)
    pair = synth.write_pair(str(tmp_path / "pair"), grid, seed=2, amplitude_voxels=0.0,
                            chunks=16)
    field_grid = grid.coarsened(2.0)
    points = field_grid.region_points(whole_region(field_grid.shape_zyx))
    u = points @ AFFINE.T + np.array([1.5, -2.0, 0.5]) - points
    out = with_field(pair, tmp_path / "out", field_grid, u)

    expected = float(np.linalg.det(AFFINE))
    tally = chunked_tally(storage.join(out, "field.ome.zarr"), 8)
    assert tally.voxels == int(np.prod(field_grid.shape_zyx))
    assert abs(tally.min - expected) < 1e-5 and abs(tally.max - expected) < 1e-5
    report = check.check(plan_qc(load_result(out)))
    jacobian = report.jacobian
    assert jacobian["voxels"] == tally.voxels and jacobian["share_nonpositive"] == 0.0
    for key in ("min", "p01", "max"):
        assert abs(jacobian[key] - expected) < 1e-5, (key, jacobian[key], expected)

    # A reflection folds everything: det J = -det A < 0 at every voxel.
    mirror = np.diag([-1.0, 1.0, 1.0]) @ AFFINE
    flipped = with_field(pair, tmp_path / "mirror", field_grid, points @ mirror.T - points)
    tally = chunked_tally(storage.join(flipped, "field.ome.zarr"), 8)
    assert tally.nonpositive == tally.voxels
    assert abs(tally.max + expected) < 1e-5


def fold_field(grid: Grid, box: tuple[slice, slice, slice]) -> np.ndarray:
    """u_x = f(i) inside the y-z extent of `box`, 0 elsewhere, where f falls with slope -2
    (in world units per world unit) across the box's x range: there x ↦ x + u_x runs
    backwards. Central differences give det J = -1 strictly inside, 0 on the box's two
    x faces (both folds) and exactly 1 everywhere else."""
    ia, ib = box[2].start, box[2].stop - 1
    i = np.arange(grid.shape_zyx[2])
    f = -2.0 * grid.spacing_xyz[0] * (np.clip(i, ia, ib) - ia)
    u = np.zeros((*grid.shape_zyx, 3))
    u[box[0], box[1], :, 0] = f
    return u


def test_a_fold_written_into_a_field_is_found_and_warns(pair, tmp_path):
    grid = ome_zarr.open_image(pair["fixed"]).levels[0].grid
    box = (slice(9, 15), slice(10, 17), slice(6, 10))  # crosses the chunk border at 8
    out = with_field(pair, tmp_path / "out", grid, fold_field(grid, box))
    expected = 6 * 7 * 4
    report = check.check(plan_qc(load_result(out)))

    assert report.jacobian["nonpositive"] == expected
    assert report.jacobian["min"] == pytest.approx(-1.0, abs=1e-6)
    assert report.jacobian["max"] == pytest.approx(1.0, abs=1e-6)
    assert report.jacobian["share_nonpositive"] == pytest.approx(expected / np.prod(
        grid.shape_zyx))
    assert report.qc == "warn" and "the field folds" in report.reason
    assert sum(f["voxels"] for f in report.fold_chunks) == expected
    for fold in report.fold_chunks:  # each named chunk meets the box
        assert all(a < s.stop and b > s.start for (a, b), s in zip(fold["region"], box,
                                                                    strict=True))
    # The verdict is in qc.json too, and the slices through the centre show the fold.
    saved = json.loads(Path(out, "qc", "qc.json").read_text())
    assert saved["qc"] == "warn" and saved["jacobian"] == report.jacobian
    plan = plan_qc(load_result(out))
    plan = plan.model_copy(update={"centre_xyz": tuple(grid.index_to_world(
        np.array([12.0, 13.0, 8.0])))})
    for axis in range(3):
        assert slices.field_slice(plan, axis).fold_voxels > 0, axis


def test_tallies_merge_and_a_field_that_is_not_finite_warns():
    from dreg.qc.report import verdict

    values = np.array([[0.5, 1.0, -0.25], [np.nan, 2.0, np.inf]])
    parts = [JacobianTally.of(values[0]), JacobianTally.of(values[1]), JacobianTally()]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    summary = merged.summary()
    assert (summary["voxels"], summary["nonfinite"], summary["nonpositive"]) == (6, 2, 1)
    assert (summary["min"], summary["max"]) == (-0.25, 2.0)
    assert summary["share_nonpositive"] == pytest.approx(1 / 6)
    assert JacobianTally.of(np.full(10, 0.7)).quantile(0.01) == 0.7
    similar = {"metric": "m", "before": 1.1, "after": 1.2}
    qc, reason = verdict(summary, similar, fold_threshold=0.5)
    assert qc == "warn" and "not a number at 2 of its 6 voxels" in reason
    assert verdict({**summary, "nonfinite": 0}, similar, 0.5) == ("ok", "")


@pytest.fixture(scope="module")
def exact_qc(pair, tmp_path_factory):
    """A finished registration whose field is the pair's exact one, and its QC (in this
    process): what several tests read, made once."""
    out = finished_registration(pair, str(tmp_path_factory.mktemp("exact") / "out"))
    return out, check.check(plan_qc(load_result(out)))


def test_a_field_that_makes_things_worse_warns(pair, exact_qc, tmp_path):
    u = components_to_vectors(ome_zarr.read_region(
        ome_zarr.open_image(pair["truth"]), 0, whole_region((24, 26, 28))))
    grid = ome_zarr.open_image(pair["truth"]).levels[0].grid
    backwards = with_field(pair, tmp_path / "backwards", grid, -u)

    good = exact_qc[1]
    bad = check.check(plan_qc(load_result(backwards)))
    assert good.qc == "ok" and good.reason == ""
    assert good.similarity["after"] > good.similarity["before"]
    assert bad.similarity["after"] < bad.similarity["before"]
    assert bad.qc == "warn" and "the similarity got worse" in bad.reason


def pixels(png: bytes) -> np.ndarray:
    return mpimage.imread(io.BytesIO(png), format="png")


def assert_not_blank(name: str, png: bytes, width: int, height: int) -> None:
    rgb = pixels(png)[..., :3]
    assert rgb.shape[:2] == (height, width) and width >= 800, (name, rgb.shape)
    assert rgb.std() > 0.05, name
    if name == "metric_gain":  # a histogram (here of no blocks: the stages are not recorded)
        return
    # Each third (a slice panel) has content, not only white space.
    for third in np.array_split(rgb, 3, axis=1):
        assert (third.min(axis=-1) < 0.9).mean() > 0.05, name
        assert third.std() > 0.05, name


def test_pictures_numbers_and_page(pair, exact_qc):
    """On the exact field: numbers that match an independent computation, every picture
    (right size, not blank), qc.json and a page that holds everything."""
    out, report = exact_qc

    u = ome_zarr.read_region(ome_zarr.open_image(pair["truth"]), 0, whole_region((24, 26, 28)))
    spacing_zyx = (0.9, 1.2, 1.0)  # the pair's spacing x 1.0, y 1.2, z 0.9; no rotation
    gradient = np.stack([np.stack(np.gradient(u[c].astype(float), *spacing_zyx))
                         for c in range(3)])
    det = np.linalg.det(np.moveaxis(gradient, (0, 1), (-2, -1)) + np.eye(3))
    assert report.jacobian["min"] == pytest.approx(det.min(), abs=1e-9)
    assert report.jacobian["max"] == pytest.approx(det.max(), abs=1e-9)
    assert report.jacobian["p01"] == pytest.approx(np.percentile(det, 1), abs=2e-3)
    assert report.jacobian["voxels"] == det.size and report.jacobian["share_nonpositive"] == 0

    assert {p.name for p in report.pictures} == PICTURES
    for picture in report.pictures:
        assert_not_blank(picture.name, Path(picture.uri).read_bytes(), picture.width,
                         picture.height)
    saved = json.loads(Path(out, "qc", "qc.json").read_text())
    assert saved["qc"] == "ok" and saved["similarity"]["metric"]
    assert set(saved["jacobian"]) >= {"min", "p01", "max", "share_nonpositive", "voxels"}

    page = PageImages()
    page.feed(Path(report.page).read_text())
    assert [name for name, _ in page.images] == [p.name for p in report.pictures]
    for (name, src), picture in zip(page.images, report.pictures, strict=True):
        assert src.startswith("data:image/png;base64,")
        assert_not_blank(name, base64.b64decode(src.split(",", 1)[1]), picture.width,
                         picture.height)
    assert f"{report.jacobian['min']:.4g}" in page.text
    assert "normalized_mutual_information" in page.text


class PageImages(html.parser.HTMLParser):
    """The <img> sources of a page, by their figure's id, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.figure, self.text = [], None, ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figure = attrs.get("id")
        if tag == "img":
            self.images.append((self.figure, attrs["src"]))

    def handle_data(self, data):
        self.text += data


@needs_chromium
def test_the_page_renders_offline_in_chromium(exact_qc, tmp_path):
    report = exact_qc[1]
    with browser() as page:
        page.open(f"file://{report.page}")
        loaded = page.wait_for(f"(() => {{ const l = {LOADED_IMAGES}; "
                               f"return l.length == {len(report.pictures)} && l; }})()",
                               what="every picture decoded")
        assert all(w >= 800 for w, _ in loaded)
        text = page.evaluate("document.body.innerText")
        shot = page.screenshot(tmp_path / "page.png")
    assert "Registration quality control" in text and "det J minimum" in text
    rgb = pixels(shot.read_bytes())[..., :3]
    assert rgb.shape[1] >= 1400 and rgb.std() > 0.05


def run_cli_here(args: list[str], capfd) -> subprocess.CompletedProcess:
    """`dreg ARGS` as a call of its entry point in this process: exit status and output."""
    from cli.main import main

    capfd.readouterr()
    try:
        status = main(args)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    printed = capfd.readouterr()
    return subprocess.CompletedProcess(["dreg", *args], status, printed.out, printed.err)


@pytest.mark.prefect
def test_qc_command_refuses_bad_input(tmp_path, capfd):
    """The first as a `dreg` process, the second in this process (the same entry point,
    without another interpreter start)."""
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for args, expected, in_process in [
            (["qc", str(unfinished)], "no finished registration", False),
            (["qc", str(tmp_path / "missing")], "missing", True)]:
        if in_process:
            done = run_cli_here(args, capfd)
        else:
            done = subprocess.run([sys.executable, "-m", "cli.main", *args],
                                  capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, done.stderr[-2000:]
        assert len(lines) == 1 and expected in lines[0]


@pytest.mark.prefect
def test_qc_flow_uses_the_warped_image_and_records_its_verdict(pair, tmp_path, prefect_api,
                                                               dask_address, capfd):
    from flows.warp import warp_image

    out = finished_registration(pair, str(tmp_path / "out"))
    resampled = check.check(plan_qc(load_result(out)))
    warp_image(out, options=RunOptions(dask_address=dask_address))
    # The command in this process, reporting to the session's Prefect API.
    done = run_cli_here(["qc", out, "--dask-address", dask_address], capfd)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert (line["qc"], line["page"]) == ("ok", storage.join(out, "qc", "index.html"))
    report = check.load_report(storage.join(out, "qc"))
    assert line["jacobian"] == report.jacobian and line["flow_run_id"] == report.flow_run_id
    assert report.warped == storage.join(out, "warped.ome.zarr")
    assert report.similarity["after_from"] == "warped image"
    # The warped image is the moving image resampled through the same field.
    assert report.similarity["after"] == pytest.approx(resampled.similarity["after"],
                                                       abs=0.02)
    assert report.jacobian == resampled.jacobian
    result = load_result(out)
    assert (result.qc, result.qc_reason) == ("ok", "")
    assert report.flow_run_id and Path(out, "qc", "index.html").exists()


@pytest.mark.prefect
def test_the_qc_flow_measures_every_brick_in_its_batches(pair, tmp_path, prefect_api,
                                                          dask_address):
    """On Dask the bricks go in batches, one task run each: the flow's numbers equal
    those of every brick measured one after the other, folds included."""
    from dreg.io.batches import region_batches
    from dreg.qc.plan import brick_regions
    from flows.qc import quality_control

    grid = ome_zarr.open_image(pair["fixed"]).levels[0].grid
    box = (slice(9, 15), slice(10, 17), slice(6, 10))
    out = with_field(pair, tmp_path / "out", grid, fold_field(grid, box))
    plan = plan_qc(load_result(out))
    assert len(brick_regions(plan)) > 1 and len(region_batches(brick_regions(plan), 2)) > 1
    one_by_one = check.check(plan)
    report = quality_control(out, options=RunOptions(dask_address=dask_address))
    assert report.jacobian == one_by_one.jacobian
    assert report.jacobian["voxels"] == int(np.prod(grid.shape_zyx))
    assert sorted(map(json.dumps, report.fold_chunks)) == sorted(
        map(json.dumps, one_by_one.fold_chunks))


@pytest.mark.s3
@pytest.mark.prefect
def test_qc_on_s3(s3, prefect_api, tmp_path):
    """Inputs, OUT and OUT/qc/ on the moto S3 server; the flow starts its own cluster,
    whose workers inherit the S3 settings."""
    from flows.qc import quality_control

    root = s3.uri(uuid.uuid4().hex)
    grid = Grid((20, 22, 24), (1.0, 1.0, 1.0))
    remote = synth.write_pair(storage.join(root, "pair"), grid, seed=2, amplitude_voxels=1.0,
                              chunks=16, overwrite=True)
    out = finished_registration(remote, storage.join(root, "out"))
    report = quality_control(out, options=RunOptions(workers=1))
    assert report.qc == "ok" and report.page == storage.join(out, "qc", "index.html")
    saved = json.loads(storage.read_text(storage.join(out, "qc", "qc.json")))
    assert saved["jacobian"] == report.jacobian and saved["jacobian"]["voxels"] == 20 * 22 * 24
    for picture in report.pictures:
        assert picture.uri.startswith(storage.join(out, "qc") + "/")
        assert_not_blank(picture.name, storage.read_bytes(picture.uri), picture.width,
                         picture.height)
    assert "data:image/png;base64," in storage.read_text(report.page)
    assert load_result(out).qc == "ok"


@pytest.mark.prefect
def test_registration_without_qc_leaves_none(prefect_api, dask_address, tmp_path):
    from dreg.registration import PipelineConfig, StageConfig
    from flows.registration import register_images

    small = synth.write_pair(str(tmp_path / "pair"), Grid((24, 24, 24), (1.0, 1.0, 1.0)),
                             seed=1, amplitude_voxels=0.0, shift_voxels=(1.0, 0.0, 0.0),
                             chunks=16)
    result = register_images(small["fixed"], small["moving"], str(tmp_path / "out"),
                             pipeline=PipelineConfig(stages=[StageConfig(
                                 name="t", level=0, transform="translation",
                                 method=METHOD,
                                 parameters={"MaximumNumberOfIterations": 20})]),
                             options=RunOptions(dask_address=dask_address, qc=False))
    assert result.qc is None and not Path(tmp_path, "out", "qc").exists()
    assert json.loads(Path(result.result).read_text())["qc"] is None


def artifacts_of(api: str, flow_run_id: str) -> dict[str, dict]:
    import urllib.request

    request = urllib.request.Request(
        f"{api}/artifacts/filter", method="POST",
        data=json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return {a["key"]: a for a in json.loads(response.read())}


@pytest.mark.slow
@needs_chromium
def test_a_registration_shows_its_qc_in_the_prefect_ui(tmp_path):
    """`dreg register` against a real `prefect server start` (its UI told where its API
    is): result.json and the completion event carry the verdict, and on the run's page
    in the UI the QC pictures are seen decoded, the numbers are a table artifact and the
    QC location a link artifact."""
    from prefect_queries import wait_for_events
    from reliability_helpers import prefect_server

    from flows.artifacts import artifact_key

    pair_ = synth.write_pair(str(tmp_path / "pair"), Grid((32, 32, 32), (1.0, 1.0, 1.0)),
                             seed=3, amplitude_voxels=1.0, shift_voxels=(1.0, 0.0, -1.0),
                             chunks=16)
    config = tmp_path / "pipeline.yaml"
    config.write_text("stages:\n  - name: blocks\n    level: 0\n    block_size: 16\n"
                      f"    transform: translation\n    method: {METHOD}\n"
                      "    parameters: {MaximumNumberOfIterations: 40}\n")
    out = str(tmp_path / "out")
    (tmp_path / "prefect").mkdir()
    with prefect_server(tmp_path / "prefect") as (api, env):
        env = {**env, "DREG_DASK_WORKERS": "1"}
        env.pop("DREG_DASK_ADDRESS", None)
        done = subprocess.run([sys.executable, "-m", "cli.main", "register", pair_["fixed"],
                               pair_["moving"], out, "--config", str(config)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        line = json.loads(done.stdout.strip().splitlines()[-1])
        run_id = line["flow_run_id"]
        assert line["qc"] == "ok" and load_result(out).qc == "ok"
        assert check.load_report(storage.join(out, "qc")).flow_run_id == run_id
        completed = wait_for_events(api, "dreg.registration.completed",
                                    lambda e: e["payload"]["flow_run_id"] == run_id)
        assert completed and completed[0]["payload"]["qc"] == "ok"

        found = artifacts_of(api, run_id)
        link = found[artifact_key("qc", out)]
        # Prefect keeps a link artifact as markdown: [text](link).
        assert link["data"].endswith(f"](file://{out}/qc/index.html)")
        table = found["dreg-qc-numbers"]
        assert table["type"] == "table" and "det J minimum" in table["data"]
        assert found["dreg-qc"]["data"].count("data:image/png;base64,") == len(PICTURES)
        assert "quality control: ok" in found["dreg-summary"]["data"]

        ui = api.removesuffix("/api")
        with browser() as page:
            page.open(f"{ui}/runs/flow-run/{run_id}")
            page.wait_for("!!document.getElementById('artifacts')", what="the run's tabs")
            page.evaluate("document.getElementById('artifacts').click()")
            page.wait_for("[...document.querySelectorAll('.artifact-card, a, div')].some("
                          "e => e.textContent.trim() === 'dreg-qc')", what="the QC card")
            page.evaluate("[...document.querySelectorAll('*')].filter(e => "
                          "e.children.length === 0 && e.textContent.trim() === 'dreg-qc')"
                          "[0].click()")
            loaded = page.wait_for(f"(() => {{ const l = {LOADED_IMAGES}; "
                                   f"return l.length == {len(PICTURES)} && l; }})()",
                                   timeout=90, what="every QC picture decoded in the UI")
            shot = page.screenshot(tmp_path / "prefect-ui-qc.png")
            text = page.evaluate("document.body.innerText")
            page.open(f"{ui}/artifacts/artifact/{table['id']}")
            # The table's rows render one after another: wait for the last one asserted.
            numbers = page.wait_for("document.body && document.body.innerText.includes("
                                    "'det J minimum') && document.body.innerText.includes("
                                    "'share of voxels with det J') && document.body.innerText",
                                    what="the numbers table")
    assert all(w >= 800 for w, _ in loaded)
    assert "Quality control: ok" in text and "Jacobian determinant" in text
    assert "share of voxels with det J" in numbers
    print(json.dumps({"screenshot": str(shot)}))
    if os.environ.get("DREG_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["DREG_KEEP_SCREENSHOT"])


@pytest.mark.prefect
def test_a_warning_travels_in_the_summary_and_the_completion_event(prefect_api, tmp_path):
    """What the registration flow does with a "warn" verdict: the summary says it, and
    the completion event carries it (emitted from a child process, as events to this
    session's server must be)."""
    from prefect_queries import wait_for_events

    from dreg.registration.records import InitialRecord, RegistrationResult
    from flows.artifacts import summary_markdown

    reason = "the field folds: det J <= 0 in 2.000% of its voxels"
    result = RegistrationResult(
        output=str(tmp_path / "out"), field=str(tmp_path / "out" / "field.ome.zarr"),
        result=str(tmp_path / "out" / "result.json"), fixed="f", moving="m",
        flow_run_id=uuid.uuid4().hex, initial=InitialRecord(
            matrix=np.eye(3).tolist(), translation=[0.0] * 3), stages=[], seconds=1.0,
        qc="warn", qc_reason=reason)
    assert f"quality control: warn ({reason})" in summary_markdown(result)
    assert json.loads(result.document())["qc"] == "warn"
    script = textwrap.dedent(f"""
        from dreg.registration.records import RegistrationResult
        from flows.events import emit_completed
        emit_completed(RegistrationResult.model_validate_json({result.document()!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PREFECT_API_URL": prefect_api})
    assert done.returncode == 0, done.stderr[-2000:]
    mine = wait_for_events(prefect_api, "dreg.registration.completed",
                           lambda e: e["payload"]["flow_run_id"] == result.flow_run_id)
    assert mine and (mine[0]["payload"]["qc"], mine[0]["payload"]["qc_reason"]) == (
        "warn", reason)
