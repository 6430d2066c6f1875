"""Using a finished registration, through the real CLI and the real flows: warp, invert,
transform points. Prefect's test harness, a real LocalCluster, real zarr stores; the
registration output is made from a synthetic pair whose exact field is known, so every
result is checked against the truth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from exact_registrar import METHOD, subprocess_env
from helpers import DEFAULT_PAIR, finished_registration, pickles_under
from ngff_checks import check_scene
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v05.image import Image
from prefect_queries import final_task_runs
from scipy import ndimage

from dreg import synth
from dreg.field import open_field, sample_field
from dreg.grid import Grid, components_to_vectors, whole_region
from dreg.io import ome_zarr, storage
from flows.options import RunOptions

pytestmark = [pytest.mark.prefect]
SHAPE = (40, 44, 48)
PAIR = {**DEFAULT_PAIR, "grid": Grid(SHAPE, (1.0, 1.2, 0.9), origin_xyz=(3.0, -2.0, 5.0))}
INTERIOR = 6  # voxels from the border where the truth's preimages stay inside


@pytest.fixture
def out(pair, tmp_path):
    return finished_registration(pair, str(tmp_path / "out"))


def dreg(*args: str, api: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The real CLI; with `api`, reporting to that Prefect API (the one the session's Dask
    workers report to), else to a temporary server of its own."""
    env = subprocess_env({**os.environ, "PREFECT_API_URL": api} if api else None)
    done = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, timeout=600, env=env)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture
def dreg_here(monkeypatch, capfd):
    """The CLI as a call of its entry point in this process: its exit status and what it
    printed, as `dreg` gives them. For commands refused before any work, where a process
    of their own would only add an interpreter start (this module runs the real command
    as a process too)."""
    from cli.main import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capfd.readouterr()
        try:
            status = main(list(args))
        except SystemExit as exc:  # argparse's own errors
            status = exc.code
        printed = capfd.readouterr()
        return subprocess.CompletedProcess(["dreg", *args], status, printed.out, printed.err)
    return run


def last_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def whole(uri: str, level: int = 0) -> np.ndarray:
    image = ome_zarr.open_image(uri)
    return ome_zarr.read_region(image, level, whole_region(image.levels[level].grid.shape_zyx))


def truth_moving_points(pair: dict) -> tuple[Grid, np.ndarray]:
    """The fixed grid and, at each of its voxels, the moving point x + u_true(x)."""
    truth = open_field(pair["truth"])
    grid = truth.levels[0].grid
    points = grid.region_points(whole_region(grid.shape_zyx))
    return grid, points + components_to_vectors(whole(pair["truth"]))


def interior(array: np.ndarray) -> np.ndarray:
    return array[..., INTERIOR:-INTERIOR, INTERIOR:-INTERIOR, INTERIOR:-INTERIOR]


def test_warp_matches_the_moving_image_resampled_by_the_truth(pair, out, prefect_api,
                                                              dask_address):
    from flows.warp import warp_image

    result = warp_image(out, options=RunOptions(dask_address=dask_address))
    assert result.output == storage.join(out, "warped.ome.zarr")
    grid, moved = truth_moving_points(pair)
    moving = ome_zarr.open_image(pair["moving"])
    index = moving.levels[0].grid.world_to_index(moved)
    expected = ndimage.map_coordinates(whole(pair["moving"]), np.moveaxis(index, -1, 0),
                                       order=1)
    warped = whole(result.output)
    assert warped.dtype == np.float32 and warped.shape == SHAPE
    np.testing.assert_allclose(interior(warped), interior(expected), atol=1e-3)
    # It is the registration's answer: warped looks like the fixed image.
    fixed = whole(pair["fixed"])
    assert np.abs(interior(warped - fixed)).mean() < 0.2 * np.abs(interior(
        whole(pair["moving"]) - fixed)).mean()
    # A pyramid every viewer opens, marked complete last.
    model = open_ome_zarr(zarr.open_group(result.output, mode="r"))
    assert isinstance(model, Image)
    assert len(ome_zarr.open_image(result.output).levels) == result.levels >= 1
    assert ome_zarr.open_image(result.output).attributes["complete"] is True


def test_warp_reruns_from_its_cache_and_labels_stay_labels(pair, out, prefect_api,
                                                          dask_address, tmp_path):
    from flows.warp import warp_image

    labels_uri = str(tmp_path / "labels.ome.zarr")
    moving = ome_zarr.open_image(pair["moving"])
    labels = ome_zarr.create_image(labels_uri, [moving.levels[0].grid], "uint16", chunks=16)
    values = (whole(pair["moving"]) // 25).astype(np.uint16) * 1000 + 7
    ome_zarr.write_region(labels, 0, whole_region(SHAPE), values)
    dest = str(tmp_path / "labels-warped.ome.zarr")
    options = RunOptions(dask_address=dask_address)
    first = warp_image(out, image=labels_uri, to=dest, interpolation="nearest", options=options)
    warped = whole(dest)
    assert warped.dtype == np.uint16
    assert set(np.unique(warped)) <= set(np.unique(values)) | {0}
    for level in range(1, first.levels):
        assert set(np.unique(whole(dest, level))) <= set(np.unique(values)) | {0}
    # Issue 18 item 2: no run keeps pickled state in the output; a record that looks like
    # an old Prefect result (a pickle whose payload would make `marker`) is never loaded.
    assert pickles_under(out) == [] and pickles_under(dest) == []
    marker = tmp_path / "payload-ran"
    plant_pickled_results(out, marker)
    written = chunk_stamps(dest)
    started = time.perf_counter()
    second = warp_image(out, image=labels_uri, to=dest, interpolation="nearest",
                        options=options)
    assert second.voxels == first.voxels
    np.testing.assert_array_equal(whole(dest), warped)
    # One task run per batch of chunks (issue 19 item 9), every chunk under its own mark.
    states = chunk_states(second.flow_run_id, "warp-chunks")
    assert 0 < first.batches <= first.chunks and len(states) == first.batches, states
    # The re-run redid no chunk: every chunk of every level is the one written first.
    assert written and chunk_stamps(dest) == written
    assert not marker.exists()
    assert pickles_under(dest) == []
    assert time.perf_counter() - started < 300


class _Payload:
    """Unpickling this runs open(path, "w"): it makes the file, as a crafted record would."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickled_results(out: str, marker: Path) -> None:
    """Issue 18 item 2: turn every Prefect result record under OUT/.prefect-results into
    a crafted pickle that makes `marker` when loaded, or plant one where there is none."""
    import base64
    import pickle

    payload = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    folder = Path(out, ".prefect-results")
    records = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    for path in records:
        record = json.loads(path.read_text())
        record["result"] = payload
        path.write_text(json.dumps(record))
    if not records:
        folder.mkdir(exist_ok=True)
        (folder / ("0" * 64)).write_text(json.dumps({
            "metadata": {"storage_key": "0" * 64, "expiration": None, "storage_block_id": None,
                         "serializer": {"type": "pickle", "picklelib": "cloudpickle",
                                        "picklelib_version": None}},
            "result": payload}))


def chunk_stamps(uri: str) -> dict[str, int]:
    """Every chunk file of a local Zarr image, with its modification time in ns."""
    return {str(p): p.stat().st_mtime_ns for p in Path(uri).rglob("*")
            if p.is_file() and "c" in p.relative_to(uri).parts}


def chunk_states(flow_run_id: str, name: str) -> list[str]:
    """States of the task runs named `name`* in the subflows of a flow run."""
    from uuid import UUID

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = final_task_runs(FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(flow_run_id)])), name)
    return [r.state.name for r in runs]


def test_invert_round_trips_and_marks_the_scene_a_bijection(pair, out, prefect_api,
                                                            dask_address):
    from flows.invert import invert_field

    result = invert_field(out, options=RunOptions(dask_address=dask_address))
    report = json.loads(Path(out, "inverse.json").read_text())
    assert report["voxels"] == result.voxels > 0 and len(report["per_chunk"]) == result.chunks
    # One task run per batch of chunks (issue 19 item 5), every chunk under its own mark.
    assert 0 < result.batches <= result.chunks
    assert len(chunk_states(result.flow_run_id, "invert-chunks")) == result.batches
    assert result.max < 1e-2 and result.p99 <= 1e-2
    # Against the truth: a fixed point x maps to y = x + u(x); y + v(y) comes back to x.
    grid, moved = truth_moving_points(pair)
    inside = interior(np.moveaxis(moved, -1, 0))
    y = np.moveaxis(inside, 0, -1).reshape(-1, 3)
    x = interior(np.moveaxis(grid.region_points(whole_region(SHAPE)), -1, 0))
    x = np.moveaxis(x, 0, -1).reshape(-1, 3)
    back = y + sample_field(open_field(result.output, mapping="moving_to_fixed"), y)
    spacing = np.asarray(grid.spacing_xyz)
    assert np.nanmax(np.abs(back - x) / spacing) < 0.05
    assert not np.isnan(back).any()
    check_scene(out, bijection=True, unit="micrometer")
    # Issue 18 item 2: a re-run resumes from the chunk marks, never from pickles in OUT.
    assert pickles_under(out) == []
    written = chunk_stamps(result.output)
    again = invert_field(out, options=RunOptions(dask_address=dask_address))
    assert chunk_stamps(result.output) == written and again.max == result.max
    assert pickles_under(out) == []


def test_points_both_ways_keep_rows_and_columns(pair, out, prefect_api, dask_address,
                                                tmp_path, dreg_here):
    rng = np.random.default_rng(3)
    grid, _ = truth_moving_points(pair)
    index = rng.uniform(INTERIOR, np.array(SHAPE) - 1 - INTERIOR, (500, 3))
    world = grid.index_to_world(index)
    world[5] = [1e4, 1e4, 1e4]  # far outside the field: NaN, counted
    frame = pd.DataFrame({"cell": [f"c{i}" for i in range(500)], "x": world[:, 0],
                          "y": world[:, 1], "z": world[:, 2], "area": np.arange(500) * 0.5})
    source = tmp_path / "cells.csv"
    frame.to_csv(source, index=False)
    moved_uri = tmp_path / "cells-moving.parquet"
    done = dreg("transform-points", out, str(source), str(moved_uri), "--from", "fixed",
                "--dask-address", dask_address, api=prefect_api)
    summary = last_json(done)
    assert summary["rows"] == 500 and summary["outside"] == 1
    moved = pd.read_parquet(moved_uri)
    assert list(moved.columns) == list(frame.columns)
    assert moved["cell"].tolist() == frame["cell"].tolist()
    np.testing.assert_array_equal(moved["area"], frame["area"])
    model = synth.make_model(grid, 4, 1.5, (1.0, -1.5, 2.0))
    xyz = moved[["x", "y", "z"]].to_numpy()
    keep = np.arange(500) != 5
    np.testing.assert_allclose(xyz[keep], world[keep] + model.displacement(world[keep]),
                               atol=0.05)
    assert np.isnan(xyz[5]).all()

    # Back from the moving space: the inverse is computed first, since OUT has none. The
    # command in this process (the one above ran as a process of its own).
    back_uri = tmp_path / "cells-back.csv"
    done = dreg_here("transform-points", out, str(moved_uri), str(back_uri), "--from",
                     "moving", "--dask-address", dask_address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(out, "inverse.ome.zarr").exists()
    back = pd.read_csv(back_uri)
    assert back["cell"].tolist() == frame["cell"].tolist()
    np.testing.assert_allclose(back[["x", "y", "z"]].to_numpy()[keep], world[keep],
                               atol=0.05)
    assert pickles_under(out) == [] and pickles_under(str(tmp_path)) == []  # issue 18 item 2


def test_warp_command_prints_json_last_and_refuses_bad_input(pair, out, prefect_api,
                                                             dask_address, tmp_path,
                                                             dreg_here):
    done = dreg("warp", out, "--dask-address", dask_address, api=prefect_api)
    assert last_json(done)["output"] == storage.join(out, "warped.ome.zarr")
    # Issue 18 item 3: another warp onto an image dreg wrote needs --overwrite, and then
    # replaces it.
    # In this process, which is cheaper than more commands (the CLI's line for the same
    # error is the last case below).
    from dreg.apply.plan import plan_warp
    from dreg.errors import InputError
    from flows.warp import warp_image

    warped = storage.join(out, "warped.ome.zarr")
    with pytest.raises(InputError, match=f"^{warped}: already exists \\(pass --overwrite"):
        plan_warp(out, image=pair["fixed"])
    assert ome_zarr.open_image(warped).attributes["image"] == pair["moving"]
    warp_image(out, image=pair["fixed"],
               options=RunOptions(dask_address=dask_address, overwrite=True))
    assert ome_zarr.open_image(warped).attributes["image"] == pair["fixed"]
    assert ome_zarr.open_image(warped).attributes["complete"] is True

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    far = str(tmp_path / "far.ome.zarr")
    far_grid = Grid(SHAPE, (1.0, 1.0, 1.0), origin_xyz=(1e4, 1e4, 1e4))
    ome_zarr.create_image(far, [far_grid], "float32", chunks=16)
    no_xyz = tmp_path / "no-xyz.csv"
    pd.DataFrame({"x": [1.0], "q": [2.0]}).to_csv(no_xyz, index=False)
    cases = [
        (["warp", str(unfinished)], "no finished registration"),
        (["invert", str(unfinished)], "no finished registration"),
        (["warp", out, "--image", far], "far.ome.zarr"),
        (["warp", out], f"{warped}: already exists (pass --overwrite to replace it)"),
        (["transform-points", out, str(no_xyz), str(tmp_path / "o.csv"), "--from", "fixed"],
         "no-xyz.csv"),
    ]
    for args, expected in cases:
        done = dreg_here(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in done.stderr


@pytest.mark.s3
def test_warp_invert_and_points_on_s3(s3, prefect_api, tmp_path, dask_address):
    """Everything on the moto S3 server: inputs, OUT, points in and out. The warp starts
    its own local cluster, whose workers inherit the S3 settings; the inversion and the
    points (whose clusters are started by the same code) run on the session's cluster,
    given the S3 settings, which saves two cluster starts."""
    import uuid

    from flows.invert import invert_field
    from flows.points import transform_points_file
    from flows.warp import warp_image

    root = s3.uri(uuid.uuid4().hex)
    grid = Grid((24, 28, 32), (1.0, 1.0, 1.0))
    pair = synth.write_pair(storage.join(root, "pair"), grid, seed=2, amplitude_voxels=1.0,
                            chunks=16, overwrite=True)
    out = finished_registration(pair, storage.join(root, "out"))
    options = RunOptions(workers=1)
    warped = warp_image(out, options=options)
    assert ome_zarr.open_image(warped.output).attributes["complete"] is True
    with s3_on_workers(dask_address, s3.endpoint_url):
        on_session = RunOptions(dask_address=dask_address)
        inverse = invert_field(out, options=on_session)
        assert inverse.max < 1e-2
        assert json.loads(storage.read_text(storage.join(out, "inverse.json")))["voxels"] > 0

        world = grid.index_to_world(np.array([[12.0, 14.0, 16.0], [10.5, 9.0, 20.0]]))
        points_in = storage.join(root, "cells.csv")
        storage.write_text(points_in, pd.DataFrame(
            {"x": world[:, 0], "y": world[:, 1], "z": world[:, 2], "id": [7, 9]}).to_csv(
            index=False))
        points_out = storage.join(root, "cells-moving.parquet")
        result = transform_points_file(out, points_in, points_out, "fixed",
                                       options=on_session)
    assert result.rows == 2 and result.outside == 0
    fs, path = storage.filesystem(points_out)
    with fs.open(path, "rb") as handle:
        moved = pd.read_parquet(handle)
    model = synth.make_model(grid, 2, 1.0, (0.0, 0.0, 0.0))
    np.testing.assert_allclose(moved[["x", "y", "z"]].to_numpy(),
                               world + model.displacement(world), atol=0.05)
    assert moved["id"].tolist() == [7, 9]


def test_register_with_warp_leaves_a_scene_and_a_warped_image(prefect_api, dask_address,
                                                              tmp_path):
    pair = synth.write_pair(str(tmp_path / "pair"), Grid((32, 32, 32), (1.0, 1.0, 1.0)),
                            seed=1, amplitude_voxels=0.0, shift_voxels=(1.0, 0.0, -1.0),
                            chunks=16, overwrite=True)
    config = tmp_path / "pipeline.yaml"
    # The exact registrar (the registration's accuracy with elastix is test_registration.py's).
    config.write_text("stages:\n  - name: shift\n    level: 0\n    transform: translation\n"
                      f"    method: {METHOD}\n    parameters: {{MaximumNumberOfIterations: 60}}\n")
    out = str(tmp_path / "out")
    done = dreg("register", pair["fixed"], pair["moving"], out, "--config", str(config),
                "--warp", "--no-qc", "--dask-address", dask_address, api=prefect_api)
    line = last_json(done)
    assert line["warped"] == storage.join(out, "warped.ome.zarr")
    assert ome_zarr.open_image(line["warped"]).attributes["complete"] is True
    check_scene(out, bijection=False, unit="micrometer")
    # The warped moving image now matches the fixed image.
    difference = np.abs(whole(line["warped"]) - whole(pair["fixed"]))[4:-4, 4:-4, 4:-4]
    before = np.abs(whole(pair["moving"]) - whole(pair["fixed"]))[4:-4, 4:-4, 4:-4]
    assert difference.mean() < 0.2 * before.mean()


def test_a_second_run_on_one_output_is_refused_naming_the_owner(prefect_api, dask_address,
                                                               tmp_path):
    """Two runs on one OUT: exactly one owner; the other is refused at once (exit 2)
    naming the owner's flow run id. Two runs on different OUTs both succeed. The exact
    registrar, with blocks of 1 s: the first run still holds OUT when the second asks."""
    pair = synth.write_pair(str(tmp_path / "pair"), Grid((32, 32, 32), (1.0, 1.0, 1.0)),
                            seed=2, amplitude_voxels=1.0, chunks=16, overwrite=True)
    config = tmp_path / "pipeline.yaml"
    config.write_text("stages:\n  - name: b\n    level: 0\n    block_size: 16\n"
                      f"    transform: translation\n    method: {METHOD}\n"
                      "    parameters: {seconds: 1}\n")
    command = [sys.executable, "-m", "cli.main", "register", pair["fixed"], pair["moving"]]
    env = subprocess_env({**os.environ, "PREFECT_API_URL": prefect_api})
    first = subprocess.Popen([*command, str(tmp_path / "a"), "--config", str(config),
                              "--no-qc", "--dask-address", dask_address], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    owner = None
    deadline = time.monotonic() + 120
    while owner is None and time.monotonic() < deadline and first.poll() is None:
        from dreg.io.ownership import read_owner

        owner = read_owner(str(tmp_path / "a"))
        time.sleep(0.2)
    assert owner is not None, "the first run never took the lease"
    # A run on another OUT, started while the first holds its own.
    other = subprocess.Popen([*command, str(tmp_path / "b"), "--config", str(config),
                              "--no-qc", "--dask-address", dask_address], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    second = dreg("register", pair["fixed"], pair["moving"], str(tmp_path / "a"), "--config",
                  str(config), "--dask-address", dask_address, api=prefect_api, check=False)
    refused_after = time.monotonic() - started
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2, second.stderr[-2000:]
    assert len(lines) == 1 and owner["owner"] in lines[0] and "in use by run" in lines[0]
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert json.loads(stdout.strip().splitlines()[-1])["flow_run_id"] == owner["owner"]
    other_out, other_err = other.communicate(timeout=300)
    assert other.returncode == 0, other_err[-2000:]
    assert json.loads(other_out.strip().splitlines()[-1])["output"] == str(tmp_path / "b")
    print(json.dumps({"refused_after_s": round(refused_after, 2)}))


def test_a_repeated_ingest_event_with_the_same_inputs_is_a_no_op(prefect_api, dask_address,
                                                                tmp_path, monkeypatch):
    import yaml

    from dreg.registration import PipelineConfig, StageConfig
    from flows.ingest import register_on_ingest

    def configure(pipeline) -> None:
        """The worker's settings (issue 18 item 4: not run parameters)."""
        path = tmp_path / f"pipeline-{len(list(tmp_path.glob('pipeline-*')))}.yaml"
        path.write_text(yaml.safe_dump(pipeline.model_dump(mode="json", exclude_none=True)))
        monkeypatch.setenv("DREG_PIPELINE", str(path))

    pair = synth.write_pair(str(tmp_path / "in"), Grid((32, 32, 32), (1.0, 1.0, 1.0)),
                            seed=5, amplitude_voxels=0.0, shift_voxels=(1.0, 0.0, 0.0),
                            chunks=16, overwrite=True)
    pipeline = PipelineConfig(stages=[StageConfig(
        name="t", level=0, transform="translation",
        parameters={"MaximumNumberOfIterations": 20})])
    monkeypatch.setenv("DREG_REFERENCE", pair["fixed"])
    monkeypatch.setenv("DREG_OUT_PREFIX", str(tmp_path / "results"))
    monkeypatch.setenv("DREG_ALLOWED_PREFIXES", str(tmp_path))
    monkeypatch.setenv("DREG_DASK_ADDRESS", dask_address)
    configure(pipeline)
    request = dict(moving=pair["moving"], version="v1", warp=False)
    first = register_on_ingest(**request)
    result_file = Path(first.result)
    written = result_file.stat().st_mtime_ns
    second = register_on_ingest(**request)
    assert second.flow_run_id == first.flow_run_id  # the existing result, not a new run
    assert result_file.stat().st_mtime_ns == written
    # Other inputs (another pipeline) are not "the same": that is a refusal, not a no-op.
    other = pipeline.model_copy(update={"stages": [pipeline.stages[0].model_copy(
        update={"parameters": {"MaximumNumberOfIterations": 21}})]})
    configure(other)
    with pytest.raises(Exception, match="already holds a finished registration"):
        register_on_ingest(**request)
    # A run started by an event may not load code named by its parameters.
    untrusted = pipeline.model_copy(update={"stages": [pipeline.stages[0].model_copy(
        update={"method": METHOD})]})
    configure(untrusted)
    with pytest.raises(Exception, match=f"pipeline: method '{METHOD}' is not allowed here"):
        register_on_ingest(**request)


@contextmanager
def s3_on_workers(dask_address: str, endpoint_url: str) -> Iterator[None]:
    """The session's workers started before the S3 server: give them its settings while
    inside, then restore theirs. (A client of the session's cluster is open only while
    setting them: a flow that starts a cluster of its own must not find it.)"""
    import s3_server
    from distributed import Client

    variables = s3_server.environment(endpoint_url)

    def restore(dask_worker) -> None:
        for name, value in saved[dask_worker.address].items():
            os.environ.pop(name, None) if value is None else os.environ.update({name: value})

    with Client(dask_address, set_as_default=False) as client:
        saved = client.run(lambda: {name: os.environ.get(name) for name in variables})
        client.run(lambda: os.environ.update(variables))
    try:
        yield
    finally:
        with Client(dask_address, set_as_default=False) as client:
            client.run(restore)


@pytest.mark.s3
def test_an_s3_endpoint_that_stops_answering_for_20_s_is_survived(s3, prefect_api, tmp_path,
                                                                  dask_address):
    """The moto server is frozen (SIGSTOP) for 20 s while a warp reads and writes S3; the
    run waits it out and its result equals an undisturbed run's. On the session's cluster
    (test_warp_invert_and_points_on_s3 starts clusters of the flows' own)."""
    import signal
    import threading
    import uuid

    from flows.warp import warp_image

    root = s3.uri(uuid.uuid4().hex)
    pair = synth.write_pair(storage.join(root, "pair"), Grid((32, 32, 32), (1.0, 1.0, 1.0)),
                            seed=6, amplitude_voxels=1.0, chunks=16, overwrite=True)
    out = finished_registration(pair, storage.join(root, "out"))
    with s3_on_workers(dask_address, s3.endpoint_url):
        options = RunOptions(dask_address=dask_address)
        calm = warp_image(out, to=storage.join(root, "calm.ome.zarr"), options=options)

        paused = threading.Event()

        def freeze_when_writing() -> None:
            dest = storage.join(root, "paused.ome.zarr", "zarr.json")
            deadline = time.monotonic() + 120
            while not storage.exists(dest) and time.monotonic() < deadline:
                time.sleep(0.1)
            s3.process.send_signal(signal.SIGSTOP)
            paused.set()
            time.sleep(20)
            s3.process.send_signal(signal.SIGCONT)

        freezer = threading.Thread(target=freeze_when_writing, daemon=True)
        freezer.start()
        started = time.perf_counter()
        try:
            stormy = warp_image(out, to=storage.join(root, "paused.ome.zarr"),
                                options=options)
        finally:
            freezer.join(timeout=60)
            s3.process.send_signal(signal.SIGCONT)
    assert paused.is_set()
    assert time.perf_counter() - started >= 20
    np.testing.assert_array_equal(whole(stormy.output), whole(calm.output))
    assert ome_zarr.open_image(stormy.output).attributes["complete"] is True


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_corrupt_chunk_fails_the_warp_command_naming_image_level_and_chunk(
        pair, out, prefect_api, dask_address, tmp_path, dreg_here):
    """One flipped byte in a chunk of the field (read while planning) or of the image
    (read by a chunk task on the cluster): exit 2 with one `dreg: error:` line naming the
    image, the level and the chunk; never a warped image made of garbage."""
    image = tmp_path / "moving-copy.ome.zarr"
    shutil.copytree(pair["moving"], image)
    flip_one_byte(image / "0" / "c" / "1" / "0" / "1")
    done = dreg("warp", out, "--image", str(image), "--to", str(tmp_path / "w.ome.zarr"),
                "--dask-address", dask_address, api=prefect_api, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("dreg: error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert errors == [f"dreg: error: {image}: level 0 (array '0'), chunk (1, 0, 1) (z, y, x) "
                      "corrupt (its crc32c checksum does not match its bytes)"]
    assert not ome_zarr.open_image(str(tmp_path / "w.ome.zarr")).attributes.get("complete")

    field = Path(out) / "field.ome.zarr"
    flip_one_byte(field / "0" / "c" / "0" / "0" / "1" / "0")
    done = dreg_here("warp", out)  # refused while planning, in this process
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"dreg: error: {field}: level 0 (array '0'), chunk (0, 1, 0) (z, y, x) corrupt "
        "(its crc32c checksum does not match its bytes)"]
    assert "Traceback" not in done.stderr


def test_warp_and_invert_refuse_an_output_in_or_over_what_they_read(pair, tmp_path,
                                                                     dreg_here):
    """The warped image inside the image or field it reads, equal to one however
    spelled, or over a folder holding an input or OUT; the inverse of a registration
    whose OUT lies inside its moving image: exit 2, one line naming both, nothing written."""
    out = finished_registration(pair, str(tmp_path / "out"))
    field = storage.join(out, "field.ome.zarr")
    moving, pair_folder = pair["moving"], str(Path(pair["moving"]).parent)
    cases = [
        (["--to", moving + "/w.ome.zarr"], f"is inside the image {moving}"),
        (["--to", out + "/stages/../field.ome.zarr/"], f"is the field {field}"),
        (["--image", pair["fixed"], "--to", pair_folder],
         f"the image {pair['fixed']} is inside the warped image {pair_folder}"),
        (["--to", str(tmp_path)], f"the field {field} is inside the warped image {tmp_path}"),
    ]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    inputs_before = sorted(str(p) for p in Path(pair_folder).rglob("*"))
    for args, expected in cases:
        done = dreg_here("warp", out, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert len(lines) == 1 and expected in lines[0], (args, lines)
        assert "Traceback" not in done.stderr

    # A registration made (by an older version) with OUT inside its moving image.
    inside = tmp_path / "moving-copy.ome.zarr"
    shutil.copytree(moving, inside)
    nested = finished_registration({**pair, "moving": str(inside)}, str(inside / "out"))
    done = dreg_here("invert", nested)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"dreg: error: the inverse {nested}/inverse.ome.zarr is inside MOVING {inside}: a "
        "result must not be written into an input; choose a location outside it"]
    assert sorted(str(p) for p in tmp_path.rglob("*") if "moving-copy" not in str(p)) == before
    assert sorted(str(p) for p in Path(pair_folder).rglob("*")) == inputs_before


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_warp_and_invert_never_replace_a_folder_dreg_did_not_write(pair, tmp_path,
                                                                    dreg_here):
    """Issue 18 item 3: `warp --to DIR` (with or without --overwrite) and `invert` over a
    folder at OUT/inverse.ome.zarr that is not an inverse field: exit 2, one line naming
    the folder, which survives byte for byte."""
    out = finished_registration(pair, str(tmp_path / "out"))
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    inverse = Path(out, "inverse.ome.zarr")
    shutil.copytree(mine, inverse)
    before = tree_bytes(mine)
    done = dreg_here("warp", out, "--to", str(mine))  # the command's line
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"dreg: error: {mine}: exists and is not an OME-Zarr image written by dreg; not "
        "replaced (move it away or choose another destination)"]
    # The same check, in this process (cheaper than more commands): --overwrite changes
    # nothing for a folder dreg did not write, nor does invert's own name in OUT.
    from dreg.apply.plan import plan_invert, plan_warp
    from dreg.errors import InputError

    with pytest.raises(InputError, match=f"{mine}: exists and is not an OME-Zarr image"):
        plan_warp(out, to=str(mine), overwrite=True)
    with pytest.raises(InputError, match=f"{inverse}: exists and is not an inverse field"):
        plan_invert(out)
    # Nor does a registration of OUT remove them as its stale derived outputs.
    from dreg.apply.plan import check_derived_replaceable

    with pytest.raises(InputError, match=f"{inverse}: exists and is not an inverse field"):
        check_derived_replaceable(out)
    shutil.copytree(mine, Path(out, "warped.ome.zarr"))
    with pytest.raises(InputError, match="warped.ome.zarr: exists and is not an OME-Zarr"):
        check_derived_replaceable(out)
    assert tree_bytes(mine) == before and tree_bytes(inverse) == before
