"""Bad input through the command line: one line naming the input and the cause, exit
status 2, no traceback, no credentials, nothing written.

The bad inputs of local data are one table, BAD_INPUTS (at the end; issue 18), one row
per case. Each row runs as `cli.main.main` called in this process (the fast tier: no
interpreter start per case); rows marked `process` also run through the real `dreg`
command in a process of its own (the full suite; marked `full`), which also sees what
only a fresh process prints (import-time warnings, output at exit). The cases that
reach S3 or Prefect run only as real processes, whose clients and settings are per
process, in the tests between.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import itk
import numpy as np
import pytest
import s3_server
import zarr

from cli import main as cli

DREG = str(Path(sys.executable).with_name("dreg"))
SECRET = s3_server.SECRET_ACCESS_KEY
# Python's default warning filters outside __main__: what a `dreg` process does not show.
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                   ResourceWarning)


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any S3 settings (a session fixture may have set
    them), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "DREG_S3_"))}
    env.update(extra)
    return env


@dataclass(frozen=True)
class Done:
    """What a `dreg` command did: its exit status and everything it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_process(args: list[str], env: dict[str, str]) -> Done:
    """`dreg ARGS` as a process of its own, with `env` as its whole environment."""
    done = subprocess.run([DREG, *args], capture_output=True, text=True, env=env, timeout=120)
    return Done(done.returncode, done.stdout, done.stderr)


def run_in_process(args: list[str], env: dict[str, str], monkeypatch, capfd) -> Done:
    """`dreg ARGS` as a call of the entry point in this process, with `env` as the whole
    environment. Output is captured at the file descriptors (so that what ITK writes
    from C++ counts too), and a warning that a `dreg` process would show on stderr is
    added to stderr, as it would print it."""
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        for category in HIDDEN_WARNINGS:
            warnings.simplefilter("ignore", category)
        warnings.simplefilter("default", append=True)
        try:
            status = cli.main(args)
        except SystemExit as exc:  # argparse's own errors
            status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    printed = capfd.readouterr()
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                    for w in caught)
    return Done(status, printed.out, printed.err + shown)


@pytest.fixture(params=["in-process", pytest.param("process", marks=pytest.mark.full)])
def run_dreg(request, monkeypatch, capfd):
    """Run `dreg` in this process, or (full suite) as a process of its own."""
    if request.param == "process":
        return run_process
    return lambda args, env: run_in_process(args, env, monkeypatch, capfd)


def assert_one_clear_line(result: Done, names: str, cause: str) -> str:
    output = result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, output
    assert len(lines) == 1, output
    assert lines[0].startswith("dreg: error: ")
    assert names in lines[0], lines[0]
    assert cause in lines[0], lines[0]
    assert "Traceback" not in output
    assert SECRET not in output
    assert result.stdout == ""
    return lines[0]


# ----------------------------------------------------------------------------- local inputs


def ome_group(path: Path, axes: list[str], shape: tuple[int, ...], scale=None) -> None:
    """A zarr v3 group with NGFF 0.5 metadata over one array."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("0", shape=shape, chunks=shape, dtype="float32")
    transforms = [{"type": "scale", "scale": scale or [1.0] * len(axes)}]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": a, "type": "space"} for a in axes],
        "datasets": [{"path": "0", "coordinateTransformations": transforms}],
    }]}


def make_info_input(tmp: Path, case: str) -> str:
    path = tmp / f"{case}.ome.zarr"
    if case == "missing":
        pass
    elif case == "plain-directory":
        path.mkdir()
    elif case == "regular-file":
        path = tmp / "notes.txt"
        path.write_text("hello")
    elif case == "group-without-multiscales":
        zarr.open_group(str(path), mode="w").attrs["note"] = "just a group"
    elif case == "array-not-group":
        ome_group(path, ["z", "y", "x"], (2, 3, 4))
        path = path / "0"
    elif case == "2d":
        ome_group(path, ["y", "x"], (3, 4))
    elif case == "4d":
        ome_group(path, ["t", "z", "y", "x"], (2, 2, 3, 4))
    elif case == "invalid-json":
        path.mkdir()
        (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": ')
    elif case == "bad-metadata-values":
        ome_group(path, ["z", "y", "x"], (2, 3, 4), scale=[1.0, "wide", 1.0])
    return str(path)


def make_convert_input(tmp: Path, case: str) -> str:
    if case == "missing":
        return str(tmp / "missing.nii.gz")
    if case == "unsupported-extension":
        path = tmp / "image.png"
        path.write_bytes(b"\x89PNG")
        return str(path)
    if case == "junk-header":
        path = tmp / "image.nrrd"
        path.write_bytes(b"not an image at all")
        return str(path)
    if case == "truncated":
        path = tmp / "image.mha"
        itk.imwrite(itk.image_from_array(np.ones((20, 20, 20), np.float32)), str(path))
        path.write_bytes(path.read_bytes()[:-4000])
        return str(path)
    array = {"2d": np.zeros((5, 6), np.float32), "4d": np.zeros((2, 3, 5, 6), np.float32)}[case]
    path = tmp / "image.nii"
    itk.imwrite(itk.image_from_array(array), str(path))
    return str(path)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def run_here(monkeypatch, capfd):
    """`dreg` in this process only: a process of its own would prove nothing more here."""
    return lambda args, env: run_in_process(args, env, monkeypatch, capfd)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["create", "overwrite"])
def test_convert_never_replaces_a_folder_dreg_did_not_write(run_here, tmp_path, overwrite):
    """Issue 18 item 3: a folder that is not an image dreg wrote survives convert, with or
    without --overwrite, byte for byte; the one line names it."""
    run_dreg = run_here
    path = str(tmp_path / "image.mha")
    itk.imwrite(itk.image_from_array(np.zeros((4, 5, 6), np.uint8)), path)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = tree_bytes(mine)
    result = run_dreg(["convert", path, str(mine), *overwrite], clean_environment())
    assert_one_clear_line(result, str(mine), "not replaced")
    assert tree_bytes(mine) == before


def test_convert_overwrite_replaces_only_an_image_dreg_wrote(run_here, tmp_path):
    """Issue 18 item 3: --overwrite replaces a converted image; a displacement field (an
    output of another kind) is refused."""
    run_dreg = run_here
    path = str(tmp_path / "image.mha")
    itk.imwrite(itk.image_from_array(np.zeros((16, 16, 16), np.uint8)), path)
    out = tmp_path / "out.ome.zarr"
    assert run_dreg(["convert", path, str(out)], clean_environment()).returncode == 0
    assert_one_clear_line(run_dreg(["convert", path, str(out)], clean_environment()),
                          str(out), "already exists (pass --overwrite")
    again = run_dreg(["convert", path, str(out), "--overwrite", "--chunks", "8"],
                     clean_environment())
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "0" / "zarr.json").read_text())["chunk_grid"][
        "configuration"]["chunk_shape"] == [8, 8, 8]
    from dreg.field import create_field
    from dreg.grid import Grid

    field = tmp_path / "field.ome.zarr"
    create_field(str(field), Grid((4, 4, 4), (1.0, 1.0, 1.0)), fixed={"uri": "f"},
                 moving_uri="m")
    before = tree_bytes(field)
    result = run_dreg(["convert", path, str(field), "--overwrite"], clean_environment())
    assert_one_clear_line(result, str(field), "is not an OME-Zarr image written by dreg")
    assert tree_bytes(field) == before


# ----------------------------------------------------------------------------- S3 failures


@pytest.fixture
def closed_endpoint() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{s3_server.free_port()}"


def without_credentials(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No credentials anywhere boto looks: variables, config files, instance metadata."""
    empty = tmp_path / "empty"
    empty.write_text("")
    return clean_environment(AWS_SHARED_CREDENTIALS_FILE=str(empty),
                             AWS_CONFIG_FILE=str(empty), AWS_EC2_METADATA_DISABLED="true",
                             **extra)


@pytest.mark.full  # a bound on wall time, which a loaded machine's process start eats
@pytest.mark.parametrize("command", ["info", "synth"])
def test_unreachable_endpoint_fails_in_seconds(closed_endpoint, command):
    uri = "s3://bucket/data/image.ome.zarr"
    args = ["info", uri] if command == "info" else ["synth", uri, "--shape", "8"]
    env = clean_environment(AWS_ACCESS_KEY_ID=s3_server.ACCESS_KEY_ID,
                            AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
                            DREG_S3_ENDPOINT_URL=closed_endpoint)
    start = time.monotonic()
    result = run_process(args, env)
    elapsed = time.monotonic() - start
    line = assert_one_clear_line(result, uri, "cannot reach the S3 endpoint")
    assert closed_endpoint in line
    assert s3_server.ACCESS_KEY_ID not in result.stderr
    assert elapsed < 20, f"took {elapsed:.1f} s"


def test_a_dask_address_where_no_scheduler_answers_is_one_line(monkeypatch):
    """--dask-address (or DREG_DASK_ADDRESS) naming a port where nothing listens: an
    InputError naming the address and the wait, not distributed's traceback."""
    from dreg.errors import InputError
    from flows import cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "1s")
    address = f"tcp://127.0.0.1:{s3_server.free_port()}"
    with pytest.raises(InputError) as raised:
        cluster.configure_workers(address, warm=False)
    assert str(raised.value) == (f"Dask cluster {address} (--dask-address or "
                                 "DREG_DASK_ADDRESS): no scheduler answered within 1s")


@pytest.mark.full  # a process each (S3 clients are shared within a process)
@pytest.mark.parametrize("command", ["info", "synth", "convert"])
def test_missing_credentials(tmp_path, closed_endpoint, command):
    uri = "s3://bucket/data/image.ome.zarr"
    if command == "convert":  # a good input, so that the output is what fails
        path = tmp_path / "good.mha"
        itk.imwrite(itk.image_from_array(np.ones((4, 5, 6), np.float32)), str(path))
        args = ["convert", str(path), uri]
    else:
        args = ["info", uri] if command == "info" else ["synth", uri, "--shape", "8"]
    # Credentials are resolved before any connection, so the endpoint is never reached.
    env = without_credentials(tmp_path, DREG_S3_ENDPOINT_URL=closed_endpoint)
    result = run_process(args, env)
    assert_one_clear_line(result, uri, "no S3 credentials found")


@pytest.mark.s3
def test_missing_bucket_and_key_on_a_real_endpoint(s3):
    env = clean_environment(**s3_server.environment(s3.endpoint_url))
    for uri in (s3.uri("no-such-prefix", "image.ome.zarr"), "s3://no-such-bucket/image.ome.zarr"):
        result = run_process(["info", uri], env)
        assert_one_clear_line(result, uri, "no such image")


def test_good_input_still_works(run_dreg, tmp_path):
    # The same harness on a good image: status 0, JSON out, nothing on stderr.
    out = tmp_path / "pair"
    assert run_dreg(["synth", str(out), "--shape", "8"], clean_environment()).returncode == 0
    result = run_dreg(["info", str(out / "fixed.ome.zarr")], clean_environment())
    assert result.returncode == 0 and result.stderr == ""
    assert json.loads(result.stdout)["levels"][0]["shape_zyx"] == [8, 8, 8]


@pytest.mark.full  # loads Prefect's client
def test_emit_ingested_refuses_without_a_prefect_api(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = run_process(["emit-ingested", "s3://landing/new.ome.zarr", "--version", "v1"], env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert lines == ["dreg: error: no Prefect API is configured: set PREFECT_API_URL to the "
                     "Prefect server that runs the deployments"]
    assert "id" not in done.stdout


@pytest.mark.full  # loads Prefect's client
def test_emit_ingested_to_an_unreachable_api_is_an_error(tmp_path, closed_endpoint):
    env = {**os.environ, "PREFECT_API_URL": f"{closed_endpoint}/api",
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    started = time.monotonic()
    done = run_process(["emit-ingested", "s3://landing/new.ome.zarr"], env)
    assert done.returncode == 1, done.stderr
    # issue 18 (bad input): one line that says what could not be reached and why, at once.
    assert done.stderr.strip().splitlines() == [
        f"dreg: failed: the Prefect API {closed_endpoint}/api could not be reached "
        "(Connection refused); the event was not sent"], done.stderr
    assert done.stdout.strip() == ""
    assert time.monotonic() - started < 30


def write_small_pair(folder: Path) -> None:
    """What `dreg synth FOLDER --shape 32` writes, made in this process."""
    from dreg import synth
    from dreg.grid import Grid

    synth.write_pair(str(folder), Grid((32, 32, 32), (1.0, 1.0, 1.0)))


@pytest.mark.full  # runs dreg as a process
def test_a_bad_lease_length_is_refused_before_a_registration_starts(tmp_path):
    pair = tmp_path / "pair"
    write_small_pair(pair)
    result = run_process(["register", str(pair / "fixed.ome.zarr"),
                          str(pair / "moving.ome.zarr"), str(tmp_path / "out")],
                         clean_environment(DREG_LEASE_SECONDS="soon"))
    assert_one_clear_line(result, "DREG_LEASE_SECONDS='soon'", "must be a number of seconds")
    assert not any((tmp_path / "out").rglob("*"))  # nothing written (planning may make OUT)


@pytest.mark.full  # runs dreg as a process
def test_a_prefect_home_that_cannot_be_made_is_one_line_at_once(tmp_path):
    """Without PREFECT_API_URL the temporary API server keeps its database in
    PREFECT_HOME: a home under a file is refused at once, naming it, before any server
    start (which would fail until its start-up wait ran out) and before OUT is made."""
    pair = tmp_path / "pair"
    write_small_pair(pair)
    (tmp_path / "a-file").write_text("")
    env = {k: v for k, v in clean_environment().items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "a-file" / "home")
    result = run_process(["register", str(pair / "fixed.ome.zarr"),
                          str(pair / "moving.ome.zarr"), str(tmp_path / "out")], env)
    assert_one_clear_line(result, str(tmp_path / "a-file" / "home"), "Not a directory")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the table
# issue 18 (bad input): one row per bad input. Each row makes what it needs under a fresh
# folder (the working directory too), runs `dreg` in this process, and checks the one
# line (naming the input and the cause), exit status 2, and that nothing was written:
# the folder's tree is the same before and after. The section of issue 18 "Bad input"
# and items 7 (detached data files), 8 (claimed sizes) and 9 (s3:// with no bucket).

URI_SECRET = "S3CR3TVALUE"  # a secret in a URI's user information: never printed


@dataclass(frozen=True)
class Bad:
    """One bad input: `build(folder, pair)` makes what the command needs and returns its
    arguments; the line must contain `names` ("{input}": the command's first argument
    after its name) and `cause`, and none of `absent`. A row with `process` runs also
    as a `dreg` process of its own in the full suite (what only a fresh process prints:
    import-time warnings, output at exit; with `in_process` off, only so)."""

    id: str
    build: object
    names: str
    cause: str
    absent: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    process: bool = False
    # False for a row whose environment Prefect must read at the process's start: once
    # loaded in this test process, its settings no longer follow the environment.
    in_process: bool = True


def _nan_image(path: Path, pair: dict, **create) -> str:
    """An image on the pair's fixed grid whose voxels are all the fill value."""
    from dreg import synth
    from dreg.io import ome_zarr

    grid = ome_zarr.open_image(pair["fixed"]).levels[0].grid
    ome_zarr.create_image(str(path), [grid], "float32", chunks=16, **{"unit": synth.UNIT,
                                                                        **create})
    return str(path)


def _claimed_image(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...]) -> str:
    """OME-Zarr metadata that claims an array of `shape` (no chunk is written)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("0", shape=shape, chunks=chunks, dtype="float32")
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": a, "type": "space"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]}
    return str(path)


def _pipeline(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _register(config: str | None = None, *extra: str, fixed=None, moving=None, out="out"):
    def build(folder: Path, pair: dict) -> list[str]:
        f = fixed(folder, pair) if fixed else pair["fixed"]
        m = moving(folder, pair) if moving else pair["moving"]
        args = ["register", f, m, out if "://" in out else str(folder / out), *extra]
        if config is not None:
            args += ["--config", _pipeline(folder / "pipeline.yaml", config)]
        return args
    return build


def _synth(*extra: str, out: str = "pair"):
    return lambda folder, pair: ["synth", out if ":" in out else str(folder / out),
                                 "--shape", "8", *extra]


def _convert(header_name: str, header: bytes):
    def build(folder: Path, pair: dict) -> list[str]:
        (folder / "secret.bin").write_bytes(bytes(range(64)))
        (folder / "in").mkdir()
        path = folder / "in" / header_name
        path.write_bytes(header.replace(b"SECRET", str(folder / "secret.bin").encode()))
        return ["convert", str(path), str(folder / "out.ome.zarr")]
    return build


def _finished(folder: Path, pair: dict) -> str:
    """A finished registration of the pair under `folder` (its field is the truth)."""
    from helpers import finished_registration

    return finished_registration(pair, str(folder / "registration"))


def _cells(folder: Path) -> str:
    (folder / "cells.csv").write_text("x,y,z\n4,5,6\n")
    return str(folder / "cells.csv")


def _points_with_text(folder: Path, pair: dict) -> list[str]:
    out = _finished(folder, pair)
    rows = "\n".join(f"{i}.5,2,3,cell{i}" for i in range(50))
    (folder / "cells.csv").write_text(f"x,y,z,id\n{rows}\nfive,2,3,cell50\n")
    return ["transform-points", out, str(folder / "cells.csv"), str(folder / "moved.csv"),
            "--from", "fixed"]


# Nested aliases: 9^5 leaves from a few hundred bytes (the had more levels and
# gave a 580 MB error line; these are enough to show the line unbounded).
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcd", "bcde", strict=True))
NRRD_NO_ENDIAN = (b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n"
                  + bytes(256))
NRRD_DETACHED = (b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
                 b"data file: SECRET\n\n")
MHD_DETACHED = (b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
                b"ElementDataFile = ../secret.bin\n")
MHD_LISTED = (b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
              b"ElementDataFile = LIST\nSECRET\n")

INFO_CAUSES = {
    "missing": "no such image",
    "plain-directory": "not an OME-Zarr image",
    "regular-file": "not an OME-Zarr image",
    "group-without-multiscales": "not an OME-Zarr image (no multiscales metadata)",
    "array-not-group": "a zarr array, not an OME-Zarr image",
    "2d": "needs a 3D image with axes z, y, x",
    "4d": "needs a 3D image with axes z, y, x",
    "invalid-json": "unreadable zarr metadata",
    "bad-metadata-values": "unreadable OME-Zarr metadata",
}
CONVERT_CAUSES = {
    "missing": "no such file",
    "unsupported-extension": "unsupported format",
    "junk-header": "unreadable image header",
    "truncated": "cannot read voxels",
    "2d": "needs a 3D image; it has 2 dimensions",
    "4d": "needs a 3D image; it has 4 dimensions",
}


def _existing_pair(folder: Path, pair: dict) -> list[str]:
    from dreg import synth
    from dreg.grid import Grid

    synth.write_pair(str(folder / "pair"), Grid((8, 8, 8), (1.0, 1.0, 1.0)))
    return ["synth", str(folder / "pair"), "--shape", "8"]


# The rows that also run as a `dreg` process: each command's first input check, zarr's
# unreadable metadata, and ITK's own errors (which a process may also print at exit).
# Every row runs in this process; a process each costs an interpreter and its imports.
PROCESS_CASES = {"missing", "invalid-json", "junk-header", "truncated"}

CLOSED_API = ("PREFECT_API_URL", "http://127.0.0.1:9/api")  # the discard port: nothing answers
BAD_INPUTS = [
    # What an input is: missing, not an image, not 3D, unreadable.
    *[Bad(f"info-{case}", lambda folder, pair, c=case: ["info", make_info_input(folder, c)],
          "{input}", cause, env=(("AWS_SECRET_ACCESS_KEY", SECRET),),
          process=case in PROCESS_CASES)
      for case, cause in INFO_CAUSES.items()],
    Bad("info-unsupported-scheme", lambda folder, pair: ["info", "gs://bucket/image.ome.zarr"],
        "gs://bucket/image.ome.zarr", "unsupported URI scheme"),
    *[Bad(f"convert-{case}", lambda folder, pair, c=case: [
          "convert", make_convert_input(folder, c), str(folder / "out.ome.zarr")],
          "{input}", cause, process=case in PROCESS_CASES)
      for case, cause in CONVERT_CAUSES.items()],
    Bad("synth-zero-spacing", _synth("--spacing", "1,0,1"), "{input}",
        "spacing_xyz must be positive"),
    Bad("synth-existing-output", _existing_pair, "{input}", "already exists", process=True),
    # Options: refused while the arguments are read, before OUT exists.
    Bad("register-workers-0", _register(None, "--workers", "0"), "--workers", "1"),
    Bad("register-workers-negative", _register(None, "--workers", "-4"), "--workers", "'-4'"),
    Bad("register-workers-too-many", _register(None, "--workers", "100000"), "--workers",
        "less than or equal to 256"),
    Bad("register-retries-negative", _register(None, "--retries", "-1"), "--retries", "0"),
    Bad("register-batch-size-0", _register(None, "--batch-size", "0"), "--batch-size", "1"),
    Bad("register-max-failed-share-2", _register(None, "--max-failed-share", "2"),
        "--max-failed-share", "less than or equal to 1"),
    Bad("register-storage-patience-negative", _register(None, "--storage-patience", "-5"),
        "--storage-patience", "greater than or equal to 0"),
    Bad("register-storage-patience-nan", _register(None, "--storage-patience", "nan"),
        "--storage-patience", "finite"),
    Bad("warp-workers-0", lambda folder, pair: ["warp", str(folder / "out"), "--workers", "0"],
        "--workers", "greater than or equal to 1"),
    Bad("synth-chunks-0", _synth("--chunks", "0"), "--chunks", "from 8 to 512"),
    Bad("synth-workers-0", _synth("--workers", "0"), "--workers", "from 1 to 256"),
    Bad("synth-amplitude-nan", _synth("--amplitude", "nan"), "--amplitude", "'nan'"),
    Bad("synth-spacing-nan", _synth("--spacing", "nan"), "--spacing", "finite"),
    Bad("synth-origin-inf", _synth("--origin", "inf,0,0"), "--origin", "finite"),
    Bad("synth-shift-nan", _synth("--shift", "0,nan,0"), "--shift", "finite"),
    Bad("register-dask-workers-variable", _register(), "DREG_DASK_WORKERS='lots'",
        "whole number from 1 to 256", env=(("DREG_DASK_WORKERS", "lots"),)),
    Bad("register-pipeline-not-a-mapping", _register("- just\n- a list\n"), "pipeline.yaml",
        "a pipeline is a mapping"),
    Bad("register-overlap-nan", _register(
        "stages:\n  - name: affine\n    level: -1\n    transform: affine\n    overlap: .nan\n"),
        "pipeline.yaml", "overlap"),
    Bad("demo-dask-workers-variable", lambda folder, pair: ["demo", str(folder / "d")],
        "DREG_DASK_WORKERS='0'", "whole number from 1 to 256",
        env=(("DREG_DASK_WORKERS", "0"),)),
    Bad("demo-seed-negative", lambda folder, pair: ["demo", str(folder / "d"), "--seed", "-1"],
        "--seed", "'-1'"),
    # Geometry that is not finite or not consistent.
    Bad("info-nan-spacing", lambda folder, pair: ["info", _claimed_nan(folder, "scale")],
        "nan.ome.zarr", "spacing_xyz must be finite"),
    Bad("info-inf-origin", lambda folder, pair: ["info", _claimed_nan(folder, "translation")],
        "nan.ome.zarr", "origin_xyz must be finite"),
    Bad("register-nan-spacing",
        _register(fixed=lambda folder, pair: _claimed_nan(folder, "scale")),
        "nan.ome.zarr", "spacing_xyz must be finite"),
    Bad("register-all-nan-image",
        _register(fixed=lambda folder, pair: _nan_image(folder / "nan.ome.zarr", pair,
                                                         fill_value=float("nan"))),
        "nan.ome.zarr", "no finite voxel"),
    Bad("register-micrometers-onto-millimeters",
        _register(moving=lambda folder, pair: _nan_image(folder / "mm.ome.zarr", pair,
                                                          fill_value=1.0, unit="millimeter")),
        "mm.ome.zarr", "units differ"),
    Bad("register-iterations-1e9",
        _register("stages:\n  - name: affine\n    level: -1\n    transform: affine\n"
                  "    parameters: {MaximumNumberOfIterations: 1000000000}\n"),
        "MaximumNumberOfIterations", "at most 100000"),
    # Messages: bounded, one line, the cause rather than a source location, no secrets.
    Bad("register-yaml-alias-bomb", _register(BOMB), "pipeline.yaml", "aliases"),
    Bad("register-yaml-syntax", _register("stages:\n  - name: a\n   level: [\n"),
        "pipeline.yaml", "not valid YAML", ("\n",)),
    Bad("convert-itk-message", _convert("image.nrrd", NRRD_NO_ENDIAN), "image.nrrd",
        "require endian info", (".cxx",)),
    Bad("info-credentials-in-uri",
        lambda folder, pair: ["info", f"s3://AKIAKEY:{URI_SECRET}@bucket/image.ome.zarr"],
        "s3://***@bucket/image.ome.zarr", "credentials", (URI_SECRET, "AKIAKEY")),
    Bad("register-credentials-in-out",
        _register(out=f"s3://AKIAKEY:{URI_SECRET}@bucket/out"),
        "s3://***@bucket/out", "credentials", (URI_SECRET, "AKIAKEY")),
    Bad("register-config-device", lambda folder, pair: [
        "register", pair["fixed"], pair["moving"], str(folder / "out"), "--config", "/dev/zero"],
        "/dev/zero", "more than a pipeline may hold"),
    Bad("qc-fold-threshold-nan", lambda folder, pair: [
        "qc", _finished(folder, pair), "--fold-threshold", "nan"], "fold threshold nan",
        "a share between 0 and 1"),
    Bad("warp-to-s3-without-bucket", lambda folder, pair: [
        "warp", _finished(folder, pair), "--to", "s3:///warped.ome.zarr"],
        "s3:///warped.ome.zarr", "needs a bucket"),
    Bad("points-output-with-credentials", lambda folder, pair: [
        "transform-points", _finished(folder, pair), _cells(folder),
        f"s3://AKIAKEY:{URI_SECRET}@bucket/moved.csv", "--from", "fixed"],
        "s3://***@bucket/moved.csv", "credentials", ("AKIAKEY",)),
    # Found late: text in a coordinate column, refused while planning.
    Bad("points-text-in-x", _points_with_text, "cells.csv",
        "column x holds values that are not numbers (row 50: 'five')"),
    # Item 7: a header naming a data file outside its folder.
    Bad("convert-nrrd-absolute-data-file", _convert("image.nhdr", NRRD_DETACHED),
        "image.nhdr", "outside the header's folder"),
    Bad("convert-mhd-data-file-above", _convert("image.mhd", MHD_DETACHED), "image.mhd",
        "outside the header's folder"),
    Bad("convert-mhd-listed-data-file", _convert("image.mhd", MHD_LISTED), "image.mhd",
        "outside the header's folder"),
    # Item 8: metadata that claims more than any run could handle.
    Bad("register-claimed-1e15-voxels",
        _register(fixed=lambda folder, pair: _claimed_image(
            folder / "huge.ome.zarr", (10**5,) * 3, (256,) * 3)),
        "huge.ome.zarr", "voxels, more than dreg accepts"),
    Bad("info-claimed-1e15-voxels",
        lambda folder, pair: ["info", _claimed_image(folder / "huge.ome.zarr", (10**5,) * 3,
                                                     (256,) * 3)],
        "huge.ome.zarr", "voxels, more than dreg accepts"),
    Bad("info-claimed-huge-chunk",
        lambda folder, pair: ["info", _claimed_image(folder / "chunky.ome.zarr", (2048,) * 3,
                                                     (2048,) * 3)],
        "chunky.ome.zarr", "MiB each), more than dreg accepts"),
    Bad("info-claimed-too-many-chunks",
        lambda folder, pair: ["info", _claimed_image(folder / "tiny.ome.zarr", (1024,) * 3,
                                                     (1,) * 3)],
        "tiny.ome.zarr", "chunks of 1x1x1, more than dreg accepts"),
    Bad("convert-claimed-1e15-voxels", _convert(
        "huge.mhd", b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\n"
        b"ElementType = MET_FLOAT\nCompressedData = True\nElementDataFile = LOCAL\n"),
        "huge.mhd", "voxels, more than dreg accepts"),
    # Item 9: s3:// without a bucket is no local folder "s3:".
    Bad("synth-s3-without-bucket", _synth(out="s3://"), "s3://", "needs a bucket"),
    Bad("synth-s3-without-bucket-with-key", _synth(out="s3:///pair"), "s3:///pair",
        "needs a bucket"),
    Bad("synth-s3-one-slash", _synth(out="s3:/bucket/pair"), "s3:/bucket/pair",
        "not a local path nor a URI"),
    Bad("register-out-s3-without-bucket", _register(out="s3://"), "s3://", "needs a bucket"),
    # An event the registration would refuse whatever its allowed prefixes, refused before
    # it is sent (to an API where nothing listens: a sent event would fail otherwise).
    Bad("emit-relative-path", lambda folder, pair: ["emit-ingested", "landing/v.ome.zarr"],
        "uri {input}", "a local path must be absolute", env=(CLOSED_API,)),
    Bad("emit-version-with-slash", lambda folder, pair: [
        "emit-ingested", "/landing/v.ome.zarr", "--version", "2026/12"], "version",
        "only letters, digits and ._:+- are allowed", env=(CLOSED_API,)),
    Bad("emit-fixed-http", lambda folder, pair: [
        "emit-ingested", "/landing/v.ome.zarr", "--fixed", "http://host/ref.ome.zarr"],
        "--fixed http://host/ref.ome.zarr", "scheme 'http' is not allowed",
        env=(CLOSED_API,)),
    Bad("emit-api-not-a-url", lambda folder, pair: ["emit-ingested", "/landing/v.ome.zarr"],
        "PREFECT_API_URL 'localhost:4200'", "not an http:// or https:// URL",
        env=(("PREFECT_API_URL", "localhost:4200"),), process=True, in_process=False),
]


def _claimed_nan(folder: Path, which: str) -> str:
    """An image whose scale (NaN) or translation (infinite) is not finite."""
    path = folder / "nan.ome.zarr"
    ome_group(path, ["z", "y", "x"], (8, 8, 8))
    group = zarr.open_group(str(path), mode="r+")
    ome = dict(group.attrs["ome"])
    value = [float("nan"), 1.0, 1.0] if which == "scale" else [0.0, float("inf"), 0.0]
    ome["multiscales"][0]["datasets"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [1.0, 1.0, 1.0]}, {"type": "translation", "translation":
                                                      [0.0, 0.0, 0.0]}]
    transforms = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    transforms[0 if which == "scale" else 1][which] = value
    group.attrs["ome"] = ome
    return str(path)


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below `folder`: its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1,
                                         p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


TABLE = [pytest.param(bad, "in-process", id=bad.id) for bad in BAD_INPUTS if bad.in_process] + [
    pytest.param(bad, "process", id=f"{bad.id}-process", marks=pytest.mark.full)
    for bad in BAD_INPUTS if bad.process]


@pytest.mark.parametrize(("bad", "mode"), TABLE)
def test_bad_input_table(bad, mode, pair, tmp_path, monkeypatch, capfd):
    """issue 18, bad input (and items 7, 8, 9): one line naming the input and the
    cause, exit status 2, nothing written, in seconds."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)  # a relative path ("./s3:") would land here
    args = bad.build(folder, pair)
    before, pair_before = tree(folder), tree(Path(pair["fixed"]).parent)
    env = clean_environment(**dict(bad.env))
    started = time.monotonic()
    result = (run_process(args, env) if mode == "process"
              else run_in_process(args, env, monkeypatch, capfd))
    seconds = time.monotonic() - started
    line = assert_one_clear_line(result, bad.names.replace("{input}", args[1]), bad.cause)
    for text in (URI_SECRET, *bad.absent):
        assert text not in result.stderr.rstrip("\n"), line
    assert len(line) <= 1000
    assert tree(folder) == before, "something was written"
    assert tree(Path(pair["fixed"]).parent) == pair_before
    assert seconds < (60 if mode == "process" else 20), f"took {seconds:.1f} s"
