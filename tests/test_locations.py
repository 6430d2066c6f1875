"""Comparing output and input locations: one spelling per place, local and S3."""

from __future__ import annotations

import os

import pytest

from dreg.errors import InputError
from dreg.io.locations import canonical, check_apart, within


def test_local_paths_are_absolute_and_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert canonical("a/./b/../c/") == str(tmp_path / "a" / "c")
    assert canonical("link/x") == str(tmp_path / "real" / "x")


@pytest.mark.parametrize("uri, expected", [
    ("s3://b/a/b/", "s3://b/a/b"),
    ("s3://b//a///b", "s3://b/a/b"),
    ("s3://b/a/./c/../b", "s3://b/a/b"),
    ("s3://b/../../a", "s3://b/a"),
    ("s3://b/", "s3://b"),
])
def test_s3_keys_are_collapsed(uri, expected):
    assert canonical(uri) == expected


def test_within_is_by_whole_path_components():
    assert within("s3://b/img.ome.zarr/out", "s3://b/img.ome.zarr/")
    assert within("s3://b/img.ome.zarr", "s3://b/img.ome.zarr")
    assert not within("s3://b/img.ome.zarr-out", "s3://b/img.ome.zarr")
    assert not within("s3://other/img.ome.zarr", "s3://b/img.ome.zarr")
    assert within("s3://b/x", "s3://b")
    assert not within("/data/fixed.ome.zarr2", "/data/fixed.ome.zarr")


def test_check_apart_names_both():
    with pytest.raises(InputError, match=r"^OUT s3://b/f/o is inside FIXED s3://b/f:"):
        check_apart("s3://b/f/o", "OUT", {"FIXED": "s3://b/f", "MOVING": None})
    with pytest.raises(InputError, match=r"^MOVING s3://b/o/m is inside OUT s3://b/o:"):
        check_apart("s3://b/o", "OUT", {"MOVING": "s3://b/o/m"})
    check_apart("s3://b/o", "OUT", {"MOVING": "s3://b/o/m"}, may_hold_inputs=True)
    check_apart("s3://b/out", "OUT", {"FIXED": "s3://b/f", "MOVING": "s3://b/m"})
