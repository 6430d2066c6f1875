"""`dreg view` (issue 22 items 3 and 4): Neuroglancer serving the fixed image, the warped
image and det J from OME-Zarr chunk by chunk, opened in headless Chromium; the link from
the QC page and the Prefect QC artifact."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from chromium import CHROMIUM, browser
from helpers import finished_registration
from matplotlib import image as mpimage
from reliability_helpers import sigint_not_ignored

from dreg.apply import warp
from dreg.apply.plan import plan_warp
from dreg.grid import Grid, whole_region
from dreg.io import completion, ome_zarr, pyramid
from dreg.qc import check, viewer, viewer_record
from dreg.qc.jacobian import region_determinant
from dreg.qc.plan import plan_qc
from dreg.qc.report import build_report
from dreg.registration.records import load_result

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
REPO = Path(__file__).resolve().parents[1]


def warped_in_process(out: str) -> str:
    """OUT/warped.ome.zarr as `dreg warp OUT` leaves it, made here chunk by chunk (every
    level, then the completion mark) without a flow."""
    plan = plan_warp(out)
    image = warp.create_warped(plan.dest, plan.fixed_grid, plan.dtype, plan.components,
                               overwrite=True, attributes={
                                   "image": plan.image, "field": plan.field,
                                   "interpolation": plan.interpolation})
    for region in ome_zarr.chunk_regions(image.levels[0].grid.shape_zyx,
                                         image.levels[0].chunks_zyx):
        warp.warp_chunk(plan.field, plan.image, 0, plan.dest, region, plan.interpolation)
    for level in range(1, len(image.levels)):
        for region in ome_zarr.chunk_regions(image.levels[level].grid.shape_zyx,
                                             image.levels[level].chunks_zyx):
            ome_zarr.write_region(image, level, region,
                                  pyramid.downsample_region(image, level - 1, region))
    completion.mark_complete(plan.dest, plan.identity)
    return plan.dest


@pytest.fixture(scope="module")
def out(pair, tmp_path_factory) -> str:
    """A finished registration (the pair's exact field) with its warped image."""
    out = finished_registration(pair, str(tmp_path_factory.mktemp("view") / "out"))
    warped_in_process(out)
    return out


def pixels(png: bytes) -> np.ndarray:
    return mpimage.imread(io.BytesIO(png), format="png")[..., :3]


def panel_colours(rgb: np.ndarray) -> dict[str, float]:
    """Shares of a screenshot's left panel (fixed + warped) and right panel (det J) in
    the colours the layers draw: grey away from the background where fixed (red, blue)
    and warped (green) agree, red and blue where det J is above and below 1."""
    width = rgb.shape[1]
    left, right = rgb[60:, : width // 2], rgb[60:, width // 2 :]
    r, g, b = (left[..., i] for i in range(3))
    grey = (np.abs(r - g) < 0.08) & (np.abs(b - g) < 0.08) & (np.abs(g - 0.5) > 0.12)
    red, blue = right[..., 0] - right[..., 2], right[..., 2] - right[..., 0]
    return {"grey": float(grey.mean()), "red": float((red > 0.4).mean()),
            "blue": float((blue > 0.15).mean()), "std": float(rgb.std())}


@needs_chromium
@pytest.mark.full  # a browser
def test_the_viewer_loads_and_draws_every_layer_in_chromium(out, tmp_path):
    """Issue 22 item 3: the viewer of a finished OUT serves fixed, warped and det J; in
    headless Chromium (WebGL on SwiftShader, the default flags) every layer asks for its
    chunks and the screenshot shows them: fixed and warped overlaid grey where they
    agree, det J in red and blue."""
    running = viewer.start_viewer(viewer.plan_view(out))
    try:
        assert running.url.startswith("http://127.0.0.1:") and running.missing == []
        assert list(running.volumes) == ["fixed", "warped", "det J"]
        with browser() as page:
            page.open(running.url)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(
                    v.served for v in running.volumes.values()):
                time.sleep(0.25)
            assert all(v.served for v in running.volumes.values()), {
                name: v.served for name, v in running.volumes.items()}
            while True:  # chunks arrive, then the panels draw them
                shot = page.screenshot(tmp_path / "viewer.png")
                colours = panel_colours(pixels(shot.read_bytes()))
                if (colours["grey"] > 0.05 and colours["red"] > 0.01
                        and colours["blue"] > 0.005) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            layers = page.evaluate("viewer.layerManager.managedLayers.map(l => l.name)")
    finally:
        viewer.stop_viewer()
    assert layers == ["fixed", "warped", "det J"]
    assert colours["std"] > 0.05, colours
    assert colours["grey"] > 0.05 and colours["red"] > 0.01 and colours["blue"] > 0.005, colours
    # Out of core: each layer read boxes, never more than its whole (small) level once.
    for name, volume in running.volumes.items():
        assert volume.voxels_read <= 4 * np.prod(volume.shape), name


def decoded(volume: viewer.PyramidVolume, start, end, factor=(1, 1, 1)) -> np.ndarray:
    """What the viewer sends the browser for a box (npz, as LocalVolume encodes it)."""
    data, _ = volume.get_encoded_subvolume("npz", np.array(start), np.array(end),
                                           ",".join(map(str, factor)))
    return np.load(io.BytesIO(zlib.decompress(data)))


ROTATED = Grid((6, 7, 8), (0.7, 1.1, 2.0), origin_xyz=(4.0, -3.0, 1.5),
               direction=((0.8660254037844387, -0.5, 0.0), (0.5, 0.8660254037844387, 0.0),
                          (0.0, 0.0, 1.0)))


def test_layers_sit_where_their_grids_put_them(out):
    """Issue 22 item 3: a layer's transform takes Neuroglancer's voxel centre (i + 0.5)
    to the world point of index i (spacing, origin, direction; a field grid coarser than
    the image keeps its own spacing), and det J's voxels are dreg.qc.jacobian's."""
    for grid in (ROTATED, ROTATED.coarsened(3.0)):
        index = np.array([[0, 0, 0], [5, 6, 7], [2, 3, 1]], dtype=float)  # z, y, x
        placed = np.c_[index + 0.5, np.ones(3)] @ viewer.source_matrix(grid).T
        np.testing.assert_allclose(placed, grid.index_to_world(index), atol=1e-12)

    plan = viewer.plan_view(out)
    running = viewer.start_viewer(plan)
    try:
        state = running.viewer.state.to_json()
        field_grid = plan.field.levels[0].grid
        det = decoded(running.volumes["det J"], (0, 0, 0), field_grid.shape_zyx)
    finally:
        viewer.stop_viewer()
    assert [d for d in state["dimensions"]] == ["x", "y", "z"]
    assert state["dimensions"]["x"] == [1e-6, "m"]  # the pair is in micrometres
    grids = {"fixed": plan.fixed.levels[0].grid, "warped": plan.warped.levels[0].grid,
             "det J": field_grid}
    for layer in state["layers"]:
        matrix = np.array(layer["source"][0]["transform"]["matrix"])
        np.testing.assert_allclose(matrix, viewer.source_matrix(grids[layer["name"]]))
    expected, _ = region_determinant(plan.field, whole_region(field_grid.shape_zyx))
    np.testing.assert_allclose(det, expected, rtol=1e-6)


def test_a_coarse_view_reads_the_pyramid_level_not_full_resolution(tmp_path):
    """Issue 22 item 3: a box asked for at factor 4 is read from level 2 (4 x 4 x 4
    times fewer voxels than level 0 would need); a factor the pyramid does not have
    (2, 2, 1 for anisotropic voxels) is averaged from the finest level that divides it."""
    grid = Grid((20, 40, 130), (1.0, 1.0, 1.0))
    grids = pyramid.pyramid_grids(grid)
    assert len(grids) == 3
    image = ome_zarr.create_image(str(tmp_path / "image.ome.zarr"), grids, "float32",
                                  chunks=16)
    rng = np.random.default_rng(0)
    levels = [rng.random(g.shape_zyx, dtype=np.float32) for g in grids]
    for k, data in enumerate(levels):
        ome_zarr.write_region(image, k, whole_region(grids[k].shape_zyx), data)
    volume = viewer.PyramidVolume(viewer.pyramid_levels(ome_zarr.open_image(image.uri)),
                                  viewer.space(["z", "y", "x"], "micrometer"))
    assert len(volume.levels) == 3

    box = decoded(volume, (0, 2, 8), (5, 10, 33), (4, 4, 4))
    np.testing.assert_array_equal(box, levels[2][0:5, 2:10, 8:33])
    assert volume.voxels_read == box.size

    volume.voxels_read = 0
    box = decoded(volume, (1, 0, 4), (3, 6, 9), (2, 2, 1))
    expected = levels[0][1 * 2:3 * 2, 0:12, 4:9].reshape(2, 2, 6, 2, 5).mean(axis=(1, 3))
    np.testing.assert_allclose(box, expected, rtol=1e-6)
    assert volume.voxels_read == expected.size * 4

    # A chunk that cannot be read is the browser's error (HTTP 400), one line naming it.
    chunk = next(p for p in Path(image.uri, image.levels[2].path).rglob("*")
                 if p.is_file() and "c" in p.parts)
    chunk.write_bytes(b"not a chunk")
    with pytest.raises(ValueError, match="level 2|chunk"):
        decoded(volume, (0, 0, 0), (5, 10, 33), (4, 4, 4))


def test_a_type_neuroglancer_has_no_volumes_of_is_sent_as_float32(tmp_path):
    """Issue 22 item 3: an int64 image is served as float32 (Neuroglancer has no int64
    image volumes), its values kept."""
    grid = Grid((4, 5, 6), (1.0, 1.0, 1.0))
    image = ome_zarr.create_image(str(tmp_path / "labels.ome.zarr"), [grid], "int64",
                                  chunks=8)
    values = np.arange(120, dtype=np.int64).reshape(4, 5, 6) * 1000
    ome_zarr.write_region(image, 0, whole_region(grid.shape_zyx), values)
    volume = viewer.PyramidVolume(viewer.pyramid_levels(image),
                                  viewer.space(["z", "y", "x"], None))
    assert volume.info()["dataType"] == "float32"
    box = decoded(volume, (0, 0, 0), (4, 5, 6))
    assert box.dtype == np.float32 and np.array_equal(box, values.astype(np.float32))


def listening_addresses(port: int) -> list[str]:
    """The local addresses of the sockets listening on `port` (IPv4 and IPv6), from the
    kernel's tables."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.append(".".join(str(b) for b in bytes.fromhex(address)[::-1]))
                else:
                    found.append(f"ipv6:{address}")
    return found


def start_view(out: str, runtime: Path, *extra: str) -> tuple[subprocess.Popen, str, dict]:
    """`dreg view OUT` in its own process: the process, its URL line and its JSON line.
    It answers SIGINT even where this test run ignores it (started in the background by
    a non-interactive shell), as from a terminal."""
    with sigint_not_ignored():
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "view", out, *extra], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "XDG_RUNTIME_DIR": str(runtime),
                 "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    url = process.stdout.readline().strip()
    line = process.stdout.readline()
    assert url and line, process.communicate(timeout=30)
    return process, url, json.loads(line)


def stopped_output(process: subprocess.Popen, timeout: float) -> str:
    """The stderr of a process that was asked to stop; if it is still running after
    `timeout`, an AssertionError with its threads' stacks (SIGUSR1: dreg.process)."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        process.kill()
        _, stderr = process.communicate(timeout=30)
        raise AssertionError(f"still running {timeout} s after the signal; its stacks:\n"
                             f"{stderr[-6000:]}") from None


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc/net")
@pytest.mark.full  # a process that serves
def test_view_listens_on_loopback_only_and_stops_cleanly(out, tmp_path, monkeypatch):
    """Issue 22 items 3 and 4: `dreg view OUT` prints its URL, then a JSON line; its
    server listens on 127.0.0.1 only; it records itself for the QC page while it runs;
    SIGINT (Ctrl-C) stops it as every long command stops: "dreg: interrupted", exit 130,
    the record gone."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    process, url, line = start_view(out, tmp_path)
    try:
        port = int(url.split(":")[2].split("/")[0])
        assert url.startswith("http://127.0.0.1:") and line["url"] == url
        assert line["layers"] == ["fixed", "warped", "det J"] and line["missing"] == []
        assert listening_addresses(port) == ["127.0.0.1"]
        assert viewer_record.answers(url)
        assert viewer_record.running_viewer_url(out) == url
        records = list(tmp_path.glob("dreg-viewers-*/*.json"))
        assert len(records) == 1 and oct(records[0].stat().st_mode & 0o777) == "0o600"
    finally:
        process.send_signal(signal.SIGINT)
        stderr = stopped_output(process, timeout=60)
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "dreg: interrupted"
    assert not list(tmp_path.glob("dreg-viewers-*/*.json"))
    assert listening_addresses(port) == [] and viewer_record.running_viewer_url(out) is None


@pytest.mark.full  # a process that serves
def test_view_without_a_warped_image_shows_the_rest_and_says_so(pair, tmp_path):
    """Issue 22 item 3: with no OUT/warped.ome.zarr the viewer shows fixed and det J and
    names the missing layer and how to make it, in one line; SIGTERM stops it like
    Ctrl-C (exit 130)."""
    out = finished_registration(pair, str(tmp_path / "out"))
    process, url, line = start_view(out, tmp_path, "--port", "0")
    process.send_signal(signal.SIGTERM)
    stderr = stopped_output(process, timeout=60)
    assert line["layers"] == ["fixed", "det J"] and len(line["missing"]) == 1
    notes = [n for n in stderr.splitlines() if n.startswith("dreg: note:")]
    assert notes == [f"dreg: note: layer {line['missing'][0]}"]
    assert "warped.ome.zarr does not exist" in notes[0] and f"dreg warp {out}" in notes[0]
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "dreg: interrupted"


def test_view_refuses_what_is_not_a_finished_output(tmp_path, capsys):
    """Issue 22 item 3: bad input is one `dreg: error:` line and exit 2."""
    from cli.main import main

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for args, expected in [([str(unfinished)], "no finished registration"),
                           ([str(tmp_path / "missing")], "no finished registration"),
                           ([str(unfinished), "--port", "70000"], "--port")]:
        try:
            status = main(["view", *args])
        except SystemExit as exc:  # argparse refuses a bad option while parsing
            status = exc.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(lines) == 1, lines
        assert lines[0].startswith("dreg: error:") and expected in lines[0], lines


def test_a_port_in_use_is_one_line(out, capsys):
    """Issue 22 item 3: a --port another program holds is refused in one line, exit 2."""
    from cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["view", out, "--port", str(port)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith(
        f"dreg: error: --port {port}: cannot serve on 127.0.0.1:{port}"), lines


@pytest.mark.full  # loads Prefect (the artifact's markdown)
def test_the_qc_page_links_a_running_viewer_and_the_artifact_names_the_command(
        out, tmp_path, monkeypatch):
    """Issue 22 item 4: the QC page always says how to open the viewer (`dreg view OUT`),
    and links to a viewer of OUT that runs on this machine when the page is written (a
    record whose viewer no longer answers is dropped); the Prefect UI's QC markdown
    artifact names the command."""
    from flows.artifacts import qc_markdown

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    plan = plan_qc(load_result(out))  # the QC's numbers; its pictures are not the point
    report = build_report(plan, check.measure_field(plan), check.stages_of(plan), [], 0.0, None)
    check.write_report(report)
    command = f"dreg view {out}"
    page = Path(report.page).read_text()
    assert command in page and 'id="viewer-link"' not in page
    assert not list(tmp_path.glob("dreg-viewers-*"))  # looking for a viewer creates nothing

    running = viewer.start_viewer(viewer.plan_view(out))
    try:
        record = viewer_record.write_record(out, running.url)
        check.write_report(report)
        page = Path(report.page).read_text()
    finally:
        viewer.stop_viewer()
    assert f'<a id="viewer-link" href="{running.url}">' in page and command in page

    check.write_report(report)  # the viewer has stopped: no link, and its record is gone
    page = Path(report.page).read_text()
    assert 'id="viewer-link"' not in page and command in page and not record.exists()

    assert f"`{command}`" in qc_markdown(report, {})


def test_det_j_colours_span_what_the_qc_measured(tmp_path):
    """Issue 22 item 3: det J's colour scale is 1 ± the spread in OUT/qc/qc.json (so a
    gentle deformation shows), within bounds; 0.5 to 1.5 when OUT has no QC."""
    out = tmp_path / "out"
    assert viewer.jacobian_range(str(out)) == (0.5, 1.5)
    (out / "qc").mkdir(parents=True)
    for p01, top, expected in [(0.9, 1.2, (0.8, 1.2)), (0.999, 1.001, (0.95, 1.05)),
                               (-3.0, 9.0, (0.5, 1.5))]:
        (out / "qc" / "qc.json").write_text(json.dumps({"jacobian": {"p01": p01, "max": top}}))
        assert viewer.jacobian_range(str(out)) == pytest.approx(expected)
