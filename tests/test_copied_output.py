"""issue 18 item 1: every command acts on the OUT it is given. Records in OUT name what
lies inside OUT relative to OUT, so a copied or moved OUT (local → local, local → S3,
S3 → local) works for qc, warp, invert, transform-points and a re-run of the
registration (which reuses the stored blocks), and the original is never touched.

One registration made with the exact registrar per module serves every flow test here;
the plans and records are checked without a server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from exact_registrar import METHOD
from helpers import finished_registration

from cli.main import main
from dreg.apply.plan import plan_invert, plan_points, plan_warp
from dreg.errors import InputError
from dreg.io import storage
from dreg.qc.check import load_report
from dreg.qc.plan import plan_qc
from dreg.registration import PipelineConfig, StageConfig
from dreg.registration.records import load_result
from flows.options import RunOptions

STAGES = [StageConfig(name="blocks", level=0, block_size=16, overlap=0.25,
                      transform="bspline", method=METHOD)]


# ------------------------------------------------------------------------------ helpers
def tree(uri: str) -> dict[str, str]:
    """Every name below `uri` (files, hidden ones too, and local folders; S3 has no
    folders, only keys), with a hash of each file's bytes: what "the original is never
    touched" compares."""
    fs, root = storage.filesystem(uri)
    fs.invalidate_cache()  # s3fs answers from its listing cache otherwise
    found = {}
    for path, info in fs.find(root, withdirs=not storage.is_s3(uri), detail=True).items():
        name = path[len(root.rstrip("/")):]
        found[name] = (hashlib.sha256(fs.cat_file(path)).hexdigest()
                       if info["type"] == "file" else "folder")
    return found


def copy_tree(source: str, dest: str) -> None:
    """cp -r, between any two of local and S3."""
    if not storage.is_s3(source) and not storage.is_s3(dest):
        shutil.copytree(source, dest)
    elif storage.is_s3(dest):
        fs, path = storage.filesystem(dest)
        fs.put(source.rstrip("/") + "/", path, recursive=True)
    else:
        fs, path = storage.filesystem(source)
        fs.get(path.rstrip("/") + "/", dest, recursive=True)
    assert storage.exists(storage.join(dest, "result.json"))


def register(pair: dict, out: str, dask_address: str, **options):
    from flows.registration import register_images

    return register_images(fixed=pair["fixed"], moving=pair["moving"], out=out,
                           pipeline=PipelineConfig(stages=STAGES),
                           options=RunOptions(dask_address=dask_address, qc=False, **options))


def every_command(out: str, points: str, dask_address: str, capsys) -> dict[str, dict]:
    """qc, warp, invert and transform-points (from moving: through OUT's inverse) on OUT,
    through the CLI in this process; each command's JSON line."""
    capsys.readouterr()
    lines = {}
    for name, args in (("qc", ["qc", out]), ("warp", ["warp", out]),
                       ("invert", ["invert", out]),
                       ("points", ["transform-points", out, points,
                                   str(Path(points).with_suffix(f".{uuid.uuid4().hex}.csv")),
                                   "--from", "moving"])):
        assert main([*args, "--dask-address", dask_address]) == 0, name
        lines[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return lines


def check_written_into(out: str, lines: dict[str, dict]) -> None:
    """Every command's output is in OUT, and OUT's records name OUT's own parts."""
    assert lines["qc"]["output"] == out
    assert lines["qc"]["page"] == storage.join(out, "qc", "index.html")
    assert lines["warp"]["output"] == storage.join(out, "warped.ome.zarr")
    assert lines["invert"]["output"] == storage.join(out, "inverse.ome.zarr")
    assert lines["points"]["field"] == storage.join(out, "inverse.ome.zarr")
    result = load_result(out)
    assert result.qc == lines["qc"]["qc"]  # qc recorded its verdict in this OUT
    assert json.loads(storage.read_text(storage.join(out, "result.json")))["output"] == out
    assert load_report(storage.join(out, "qc")).page == lines["qc"]["page"]
    saved = json.loads(storage.read_text(storage.join(out, "inverse.json")))
    assert (saved["output"], saved["report"]) == ("inverse.ome.zarr", "inverse.json")


def use_the_copy(pair: dict, copy: str, original: str, points: str, dask_address: str,
                 capsys) -> None:
    """Every command on COPY writes into COPY; then a re-run of the registration into
    COPY reuses every stored block; the original's tree never changes."""
    before = tree(original)
    lines = every_command(copy, points, dask_address, capsys)
    assert tree(original) == before
    check_written_into(copy, lines)
    again = register(pair, copy, dask_address, overwrite=True)
    assert again.blocks_reused == {"blocks": again.stages[0].blocks}
    assert again.output == copy and again.field == storage.join(copy, "field.ome.zarr")
    assert tree(original) == before


def absolute_record(out: str, recorded: str) -> None:
    """Rewrite OUT's result.json as results were written before locations inside OUT
    were relative: absolute, in the OUT `recorded`."""
    uri = storage.join(out, "result.json")
    document = json.loads(storage.read_text(uri))

    def absolute(path: str) -> str:
        whole = storage.is_s3(path) or os.path.isabs(path)
        return path if whole else storage.join(recorded, path)

    document.update(output=recorded, field=absolute(document["field"]),
                    result=absolute(document["result"]))
    for stage in document["stages"]:
        stage["field"] = absolute(stage["field"])
    storage.write_text(uri, json.dumps(document, indent=2))
    assert document["field"] == storage.join(recorded, "field.ome.zarr")


@pytest.fixture(scope="module")
def registered(pair, prefect_api, dask_address, tmp_path_factory) -> str:
    """One finished registration (exact registrar): stage fields, block store, field."""
    out = str(tmp_path_factory.mktemp("registered") / "out")
    register(pair, out, dask_address)
    return out


@pytest.fixture(scope="module")
def points(pair, tmp_path_factory) -> str:
    """A few moving-space points, in a CSV outside every OUT."""
    uri = tmp_path_factory.mktemp("points") / "cells.csv"
    grid = load_grid(pair["moving"])
    world = grid.index_to_world(np.array([[8.0, 9.0, 10.0], [12.0, 13.0, 11.0]]))
    pd.DataFrame({"x": world[:, 0], "y": world[:, 1], "z": world[:, 2],
                  "cell": [1, 2]}).to_csv(uri, index=False)
    return str(uri)


def load_grid(uri: str):
    from dreg.io import ome_zarr

    return ome_zarr.open_image(uri).levels[0].grid


# --------------------------------------------------------------- records, no server
def test_records_name_the_parts_of_out_relative_to_out(pair, tmp_path):
    """issue 18 item 1: result.json names what lies inside OUT relative to OUT; read from
    a copy, every location is the copy's; the inputs stay as they were."""
    out = finished_registration(pair, str(tmp_path / "out"))
    saved = json.loads(Path(out, "result.json").read_text())
    assert (saved["field"], saved["result"]) == ("field.ome.zarr", "result.json")
    assert (saved["fixed"], saved["moving"]) == (pair["fixed"], pair["moving"])
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    result = load_result(copy)
    assert (result.output, result.field, result.result) == (
        copy, storage.join(copy, "field.ome.zarr"), storage.join(copy, "result.json"))
    assert (result.fixed, result.moving) == (pair["fixed"], pair["moving"])


def test_an_older_result_with_absolute_locations_reads_as_the_out_given(pair, tmp_path):
    """issue 18 item 1: a result.json written with absolute locations inside its own
    `output` reads, from a moved OUT whose original is gone, as the moved OUT; every
    command plans to read and write there only."""
    out = finished_registration(pair, str(tmp_path / "out"))
    absolute_record(out, out)
    moved = str(tmp_path / "moved")
    shutil.move(out, moved)
    result = load_result(moved)
    assert (result.output, result.field) == (moved, storage.join(moved, "field.ome.zarr"))
    assert (result.fixed, result.moving) == (pair["fixed"], pair["moving"])
    warp, invert = plan_warp(moved), plan_invert(moved)
    assert (warp.out, warp.field, warp.dest) == (
        moved, result.field, storage.join(moved, "warped.ome.zarr"))
    assert (invert.out, invert.dest, invert.report) == (
        moved, storage.join(moved, "inverse.ome.zarr"), storage.join(moved, "inverse.json"))
    cells = tmp_path / "cells.csv"
    cells.write_text("x,y,z\n5,5,5\n")
    assert plan_points(moved, str(cells), str(tmp_path / "o.csv"), "moving").field == (
        invert.dest)
    qc = plan_qc(result)
    assert (qc.out, qc.folder, qc.field) == (moved, storage.join(moved, "qc"), result.field)
    assert not Path(out).exists()


def test_the_warp_trigger_checks_the_events_output(tmp_path, monkeypatch):
    """issue 18 item 1: the warp deployment's `out` comes from an event: it must lie
    under the worker's output prefix, like every event URI; a rejected one fails
    before anything is read or written."""
    import yaml

    from flows.ingest import validated_output, warp_on_completion

    prefix = str(tmp_path / "results")
    assert validated_output(f"{prefix}/a", prefix) == f"{prefix}/a"
    assert validated_output("s3://results/regs/a", "s3://results/regs") == (
        "s3://results/regs/a")
    for out, expected in ((str(tmp_path / "elsewhere"), "outside the allowed prefixes"),
                          (f"{prefix}/../elsewhere", "outside the allowed prefixes"),
                          ("results/a", "must be absolute"),
                          ("s3://KEY:SECRET@results/regs/a", "not a valid s3:// URI"),
                          ("file:///etc", "scheme 'file' is not allowed"),
                          ("", "missing")):
        monkeypatch.setenv("DREG_OUT_PREFIX", prefix)
        with pytest.raises(InputError, match=expected):
            warp_on_completion.fn(out=out)
    monkeypatch.setenv("DREG_OUT_PREFIX", "")
    with pytest.raises(InputError, match="DREG_OUT_PREFIX: the worker has no output prefix"):
        warp_on_completion.fn(out=f"{prefix}/a")
    assert not (tmp_path / "elsewhere").exists() and not Path(prefix).exists()

    root = Path(__file__).resolve().parents[1]
    (warp,) = [d for d in yaml.safe_load((root / "deployments/prefect.yaml").read_text())[
        "deployments"] if d["name"] == "warp"]
    assert warp["entrypoint"] == "flows.ingest:warp_on_completion"
    assert "out_prefix" not in warp.get("parameters", {})  # the worker's, not the run's
    assert warp["triggers"][0]["parameters"] == {"out": "{{ event.payload.output }}"}


# ------------------------------------------------------------------------ the flows
def test_a_local_copy_is_used_and_the_original_never_touched(pair, registered, points,
                                                              tmp_path, dask_address, capsys):
    """issue 18 item 1: cp -r OUT COPY; qc, warp, invert and transform-points on COPY
    write into COPY, a re-run into COPY reuses every stored block, and OUT's tree (names
    and bytes) is what it was."""
    copy = str(tmp_path / "copy")
    copy_tree(registered, copy)
    use_the_copy(pair, copy, registered, points, dask_address, capsys)


def test_a_moved_output_works_with_the_original_gone(registered, points, tmp_path,
                                                     dask_address, capsys):
    """issue 18 item 1: OUT moved (its result.json written with absolute locations, as
    before); every command works on the moved OUT and nothing recreates the original."""
    moved = str(tmp_path / "moved")
    copy_tree(registered, moved)
    absolute_record(moved, registered)
    aside = registered + "-aside"
    shutil.move(registered, aside)
    try:
        lines = every_command(moved, points, dask_address, capsys)
        assert not Path(registered).exists()
    finally:
        shutil.move(aside, registered)
    check_written_into(moved, lines)


@pytest.mark.s3
def test_copies_between_local_and_s3(pair, registered, points, s3, dask_client,
                                     dask_address, tmp_path, capsys):
    """issue 18 item 1: local → S3, then S3 → local: a re-run into each copy reuses
    every stored block, every command writes into the copy, and the tree copied from is
    what it was."""
    import s3_server

    # The session's workers started before the S3 server: give them its settings.
    variables = s3_server.environment(s3.endpoint_url)
    saved = dask_client.run(lambda: {name: os.environ.get(name) for name in variables})

    def restore(dask_worker) -> None:
        for name, value in saved[dask_worker.address].items():
            os.environ.pop(name, None) if value is None else os.environ.update({name: value})

    dask_client.run(lambda: os.environ.update(variables))
    try:
        remote = s3.uri(uuid.uuid4().hex, "out")
        copy_tree(registered, remote)
        use_the_copy(pair, remote, registered, points, dask_address, capsys)
        back = str(tmp_path / "back")
        copy_tree(remote, back)
        use_the_copy(pair, back, remote, points, dask_address, capsys)
    finally:
        dask_client.run(restore)
