"""The same reads, writes, conversion and synthesis against s3:// through a moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import boto3
import itk
import numpy as np
import pytest
import s3_server
import zarr

from dreg import field, synth
from dreg.errors import InputError
from dreg.grid import Grid
from dreg.io import convert, ome_zarr, pyramid, storage

pytestmark = pytest.mark.s3

GRID = Grid((20, 30, 40), (0.5, 0.75, 2.0), (4.0, -3.0, 1.5), ((0, 0, 1), (0, 1, 0), (-1, 0, 0)))


def fresh(s3, name: str) -> str:
    """A URI under a prefix no other test uses."""
    return s3.uri(uuid.uuid4().hex, name)


def whole(image: ome_zarr.OmeZarrImage, level: int = 0) -> np.ndarray:
    shape = image.level(level).grid.shape_zyx
    return ome_zarr.read_region(image, level, tuple(slice(0, n) for n in shape))


def objects_under(s3, uri: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    prefix = uri.removeprefix(f"s3://{s3.bucket}/")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix=prefix) for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in keys}


def test_write_and_read_regions_on_s3(s3):
    uri = fresh(s3, "image.ome.zarr")
    grids = pyramid.pyramid_grids(GRID, coarsest_longest_axis=16)
    data = np.random.default_rng(0).integers(0, 60000, GRID.shape_zyx).astype(np.uint16)
    image = ome_zarr.create_image(uri, grids, "uint16", chunks=16)
    ome_zarr.write_level_by_chunks(image, 0, lambda region: data[region])
    pyramid.build_pyramid(image)

    reopened = ome_zarr.open_image(uri)
    assert [lv.grid for lv in reopened.levels] == grids
    assert np.array_equal(whole(reopened), data)
    for level in range(len(grids)):
        full = whole(reopened, level)
        region = tuple(slice(n // 3, n) for n in grids[level].shape_zyx)
        assert np.array_equal(ome_zarr.read_region(reopened, level, region), full[region])


def test_vector_image_on_s3(s3):
    uri = fresh(s3, "vector.ome.zarr")
    data = np.random.default_rng(1).normal(size=(3, *GRID.shape_zyx)).astype(np.float32)
    image = ome_zarr.create_image(uri, [GRID], "float32", chunks=16, components=3)
    ome_zarr.write_level_by_chunks(image, 0, lambda region: data[(slice(None), *region)])
    reopened = ome_zarr.open_image(uri)
    assert reopened.components == 3
    assert reopened.levels[0].grid == GRID
    region = (slice(5, 20), slice(0, 7), slice(30, 40))
    assert np.array_equal(ome_zarr.read_region(reopened, 0, region), data[(slice(None), *region)])


def test_reads_ome_zarr_04_v2_on_s3(s3):
    uri = fresh(s3, "v04.zarr")
    data = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    root = zarr.open_group(storage.zarr_store(uri), mode="w", zarr_format=2)
    root.create_array("0", shape=data.shape, chunks=(4, 4, 4), dtype=data.dtype)[...] = data
    root.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": a, "type": "space"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [3.0, 2.0, 1.0]},
            {"type": "translation", "translation": [1.0, 2.0, 3.0]}]}],
    }]
    image = ome_zarr.open_image(uri)
    assert image.ome_version == "0.4"
    assert image.levels[0].grid == Grid((6, 7, 8), (1.0, 2.0, 3.0), (3.0, 2.0, 1.0))
    assert np.array_equal(whole(image), data)


def test_fingerprint_changes_when_an_s3_chunk_is_rewritten(s3):
    uri = fresh(s3, "image.ome.zarr")
    data = np.random.default_rng(2).normal(size=GRID.shape_zyx).astype(np.float32)
    image = ome_zarr.create_image(uri, [GRID], "float32", chunks=16)
    ome_zarr.write_level_by_chunks(image, 0, lambda region: data[region])
    first = ome_zarr.fingerprint(image)
    assert ome_zarr.fingerprint(ome_zarr.open_image(uri)) == first
    chunk = (slice(16, 20), slice(16, 30), slice(0, 16))
    ome_zarr.write_region(image, 0, chunk, data[chunk] * 2)
    assert ome_zarr.fingerprint(image) != first


def test_synth_on_s3_equals_synth_on_disk_and_hides_credentials(s3, tmp_path):
    out = s3.uri(uuid.uuid4().hex, "pair")
    remote = synth.write_pair(out, GRID, seed=11, chunks=16)
    local = synth.write_pair(str(tmp_path), GRID, seed=11, chunks=16)
    for name in ("fixed", "moving", "truth"):
        assert remote[name] == f"{out}/{name}.ome.zarr"
        assert np.array_equal(whole(ome_zarr.open_image(remote[name])),
                              whole(ome_zarr.open_image(local[name]))), name
    truth = field.open_field(remote["truth"])
    assert truth.attributes["fixed"]["uri"] == remote["fixed"]
    written = objects_under(s3, out)
    assert any(key.endswith("zarr.json") for key in written)
    for key, content in written.items():
        assert s3_server.SECRET_ACCESS_KEY.encode() not in content, key
        assert s3_server.ACCESS_KEY_ID.encode() not in content, key


def test_convert_to_s3(s3, tmp_path):
    array = np.random.default_rng(3).integers(-3000, 3000, (30, 40, 70)).astype(np.int16)
    image = itk.image_from_array(array)
    image.SetSpacing((0.5, 0.75, 1.25))
    image.SetOrigin((1.0, 2.0, 3.0))
    image.SetDirection(itk.matrix_from_array(np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])))
    path = tmp_path / "image.mha"
    itk.imwrite(image, str(path))
    uri = fresh(s3, "image.ome.zarr")

    converted = convert.convert(path, uri, chunks=16)

    reopened = ome_zarr.open_image(uri)
    grid = reopened.levels[0].grid
    assert converted.uri == uri
    assert (grid.spacing_xyz, grid.origin_xyz) == ((0.5, 0.75, 1.25), (1.0, 2.0, 3.0))
    assert grid.direction == ((0.0, -1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0))
    assert [lv.grid.shape_zyx for lv in reopened.levels] == [(30, 40, 70), (15, 20, 35)]
    assert np.array_equal(whole(reopened), array)
    assert whole(reopened, 1).dtype == np.int16


def run_dreg(*args: str) -> subprocess.CompletedProcess:
    """The real command line, with this session's environment (the moto endpoint)."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))


def test_info_command_on_s3(s3):
    uri = fresh(s3, "image.ome.zarr")
    ome_zarr.create_image(uri, pyramid.pyramid_grids(GRID, 16), "float32", chunks=16)
    result = run_dreg("info", uri)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["uri"] == uri
    assert info["levels"][0]["spacing_xyz"] == [0.5, 0.75, 2.0]
    assert info["direction"] == [list(r) for r in GRID.direction]
    assert s3_server.SECRET_ACCESS_KEY not in result.stdout + result.stderr


def test_s3_open_errors_name_the_uri(s3):
    missing = fresh(s3, "missing.ome.zarr")
    with pytest.raises(InputError, match="no such image") as caught:
        ome_zarr.open_image(missing)
    assert str(caught.value).startswith(missing)

    broken = fresh(s3, "broken.ome.zarr")
    storage.write_text(f"{broken}/zarr.json", "{not json")
    with pytest.raises(InputError, match="unreadable zarr metadata"):
        ome_zarr.open_image(broken)

    plain = fresh(s3, "plain.zarr")
    zarr.open_group(storage.zarr_store(plain), mode="w").attrs["note"] = "no multiscales"
    with pytest.raises(InputError, match="not an OME-Zarr image"):
        ome_zarr.open_image(plain)


def test_create_on_s3_never_replaces_a_prefix_dreg_did_not_write(s3, tmp_path):
    """Issue 18 item 3, on S3: a prefix holding objects that are not an image dreg wrote
    survives convert (with and without overwrite); a converted image is replaced only with
    overwrite."""
    path = tmp_path / "image.mha"
    itk.imwrite(itk.image_from_array(np.zeros((4, 5, 6), np.uint8)), str(path))
    mine = fresh(s3, "mine")
    storage.write_text(storage.join(mine, "notes.txt"), "keep me")
    before = objects_under(s3, mine)
    with pytest.raises(InputError, match=f"{mine}: exists and is not an OME-Zarr image"):
        convert.convert(path, mine, overwrite=True)
    assert objects_under(s3, mine) == before
    uri = fresh(s3, "image.ome.zarr")
    ome_zarr.create_image(uri, [Grid((4, 5, 6), (1.0, 1.0, 1.0))], "uint8")
    with pytest.raises(InputError, match="already exists"):
        convert.convert(path, uri)
    convert.convert(path, uri, chunks=4, overwrite=True)
    assert ome_zarr.open_image(uri).levels[0].chunks_zyx == (4, 4, 4)
