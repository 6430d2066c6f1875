"""Bad input through the command line: one line naming the input and the cause, exit
status 2, no traceback, no credentials.

Each case of local input runs twice: once as `cli.main.main` called in this process
(the fast tier: no interpreter start per case) and once through the real `dreg` command
in a process of its own (the full suite; marked `full`), which also sees what only a
fresh process prints (import-time warnings, output at exit). The cases that reach S3 or
Prefect run only as real processes, whose clients and settings are per process.
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


INFO_CASES = [
    ("missing", "no such image"),
    ("plain-directory", "not an OME-Zarr image"),
    ("regular-file", "not an OME-Zarr image"),
    ("group-without-multiscales", "not an OME-Zarr image (no multiscales metadata)"),
    ("array-not-group", "a zarr array, not an OME-Zarr image"),
    ("2d", "needs a 3D image with axes z, y, x"),
    ("4d", "needs a 3D image with axes z, y, x"),
    ("invalid-json", "unreadable zarr metadata"),
    ("bad-metadata-values", "unreadable OME-Zarr metadata"),
]


@pytest.mark.parametrize(("case", "cause"), INFO_CASES, ids=[c[0] for c in INFO_CASES])
def test_info_bad_input(run_dreg, tmp_path, case, cause):
    uri = make_info_input(tmp_path, case)
    result = run_dreg(["info", uri], clean_environment(AWS_SECRET_ACCESS_KEY=SECRET))
    assert_one_clear_line(result, uri, cause)


def test_info_unsupported_scheme(run_dreg):
    result = run_dreg(["info", "gs://bucket/image.ome.zarr"], clean_environment())
    assert_one_clear_line(result, "gs://bucket/image.ome.zarr", "unsupported URI scheme")


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


CONVERT_CASES = [
    ("missing", "no such file"),
    ("unsupported-extension", "unsupported format"),
    ("junk-header", "unreadable image header"),
    ("truncated", "cannot read voxels"),
    ("2d", "needs a 3D image; it has 2 dimensions"),
    ("4d", "needs a 3D image; it has 4 dimensions"),
]


@pytest.mark.parametrize(("case", "cause"), CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_bad_input(run_dreg, tmp_path, case, cause):
    path = make_convert_input(tmp_path, case)
    out = tmp_path / "out.ome.zarr"
    result = run_dreg(["convert", path, str(out)], clean_environment())
    assert_one_clear_line(result, path, cause)
    assert not out.exists()


def test_synth_bad_grid(run_dreg, tmp_path):
    out = str(tmp_path / "pair")
    result = run_dreg(["synth", out, "--spacing", "1,0,1"], clean_environment())
    assert_one_clear_line(result, out, "spacing_xyz must be positive")


def test_existing_output_is_not_replaced(run_dreg, tmp_path):
    out = str(tmp_path / "pair")
    assert run_dreg(["synth", out, "--shape", "8"], clean_environment()).returncode == 0
    result = run_dreg(["synth", out, "--shape", "8"], clean_environment())
    assert_one_clear_line(result, out, "already exists")


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
    # issue 18 item 4: one line naming the API, at once (not "was not received" after 30 s)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"dreg: failed: cannot reach the Prefect API at "
                               f"{closed_endpoint}/api: "), lines
    assert done.stdout.strip() == ""
    assert time.monotonic() - started < 90


@pytest.mark.full  # two processes: synth, then register
def test_a_bad_lease_length_is_refused_before_a_registration_starts(tmp_path):
    pair = tmp_path / "pair"
    assert run_process(["synth", str(pair), "--shape", "32"], clean_environment()).returncode == 0
    result = run_process(["register", str(pair / "fixed.ome.zarr"),
                          str(pair / "moving.ome.zarr"), str(tmp_path / "out")],
                         clean_environment(DREG_LEASE_SECONDS="soon"))
    assert_one_clear_line(result, "DREG_LEASE_SECONDS='soon'", "must be a number of seconds")
    assert not any((tmp_path / "out").rglob("*"))  # nothing written (planning may make OUT)
