"""The block store and the reduce refuse what they cannot use (issue 18 item 6): every
malformed record is a miss, never an exception; a residual of the wrong shape, dtype or
with non-finite values is a miss in the store and an error naming the file in the
reduce, never read past its end."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

from dreg.errors import StorageError
from dreg.grid import Grid, region_shape
from dreg.registration import tiling
from dreg.registration.outcome import OK, BlockResult
from dreg.registration.reduce import blend_residuals
from dreg.registration.store import entry_uri, load_entry, save_entry

GRID = Grid((16, 16, 16), (1.0, 1.0, 1.0))
KEY = "k" * 24


@pytest.fixture
def block():
    return tiling.tile(GRID.shape_zyx, (8, 8, 8), 0.25, GRID.shape_zyx, 1.0)[0]


def good_residual(block, value=0.5):
    return np.full((3, *region_shape(block.field_box)), value, np.float32)


def stored(tmp_path, block):
    """A well-formed stored entry; returns its record (a dict) to spoil."""
    save_entry(str(tmp_path), KEY, BlockResult(block, OK, "", 1.0, 0.5, 2.0),
               good_residual(block))
    return json.loads(open(entry_uri(str(tmp_path), block, KEY, ".json")).read())


def write_record(tmp_path, block, record) -> None:
    text = record if isinstance(record, str) else json.dumps(record)
    open(entry_uri(str(tmp_path), block, KEY, ".json"), "w").write(text)


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_a_well_formed_entry_is_a_hit(tmp_path, block):
    stored(tmp_path, block)
    hit = load_entry(str(tmp_path), KEY, block)
    assert hit is not None and hit.status == OK and hit.reused


# One row per kind of malformed record: each must be a miss (None), not an exception.
MALFORMED_RECORDS = {
    "a list": lambda r: [r],
    "a number": lambda r: 7,
    "a string": lambda r: "ok",
    "null": lambda r: None,
    "not JSON": lambda r: "{",
    "no status": lambda r: {k: v for k, v in r.items() if k != "status"},
    "no version": lambda r: {k: v for k, v in r.items() if k != "version"},
    "no checksum": lambda r: {k: v for k, v in r.items() if k != "residual_sha256"},
    "an unknown status": lambda r: {**r, "status": "great"},
    "a status that is a list": lambda r: {**r, "status": ["ok"]},
    "a status that is an object": lambda r: {**r, "status": {"ok": 1}},
    "seconds as text": lambda r: {**r, "seconds": "2.0"},
    "negative seconds": lambda r: {**r, "seconds": -1},
    "seconds true": lambda r: {**r, "seconds": True},
    "a metric as text": lambda r: {**r, "metric_before": "1.0"},
    "a metric that is a list": lambda r: {**r, "metric_after": [0.5]},
    "a reason that is a number": lambda r: {**r, "reason": 3},
    "a checksum that is a number": lambda r: {**r, "residual_sha256": 12},
    "another key": lambda r: {**r, "key": "x" * 24},
}


@pytest.mark.parametrize("spoil", MALFORMED_RECORDS.values(), ids=MALFORMED_RECORDS.keys())
def test_every_malformed_record_is_a_miss(tmp_path, block, spoil):
    """issue 18 item 6: a record that is a list, lacks a field or has a text number."""
    record = stored(tmp_path, block)
    spoilt = spoil(record)
    write_record(tmp_path, block, spoilt if isinstance(spoilt, str) else json.dumps(spoilt))
    assert load_entry(str(tmp_path), KEY, block) is None


def bad_residuals(block):
    shape = region_shape(block.field_box)
    nan = good_residual(block)
    nan[1, 0, 0, 0] = np.nan
    inf = good_residual(block)
    inf[0, -1, -1, -1] = np.inf
    return {
        "too small": np.zeros((3, 2, 2, 2), np.float32),
        "too large": np.zeros((3, shape[0] + 1, *shape[1:]), np.float32),
        "two components": np.zeros((2, *shape), np.float32),
        "float64": good_residual(block).astype(np.float64),
        "int32": np.zeros((3, *shape), np.int32),
        "NaN": nan,
        "infinite": inf,
    }


@pytest.mark.parametrize("name", ["too small", "too large", "two components", "float64",
                                  "int32", "NaN", "infinite"])
def test_a_wrong_residual_is_a_miss_in_the_store(tmp_path, block, name):
    """issue 18 item 6: a residual with a matching checksum but the wrong shape, dtype or
    values is not reused."""
    record = stored(tmp_path, block)
    data = npy(bad_residuals(block)[name])
    open(entry_uri(str(tmp_path), block, KEY, ".npy"), "wb").write(data)
    write_record(tmp_path, block, {**record, "residual_sha256": hashlib.sha256(data).hexdigest()})
    assert load_entry(str(tmp_path), KEY, block) is None


@pytest.mark.parametrize("name", ["too small", "too large", "two components", "float64",
                                  "int32", "NaN", "infinite"])
def test_the_reduce_refuses_a_wrong_residual_naming_it(tmp_path, block, name):
    """issue 18 item 6: the compiled reduce never reads a residual past its end (a
    residual replaced after its block was stored fails the chunk, naming the file)."""
    uri = str(tmp_path / "residual.npy")
    open(uri, "wb").write(npy(bad_residuals(block)[name]))
    result = BlockResult(block, OK, residual_uri=uri)
    with pytest.raises(StorageError, match="residual.npy"):
        blend_residuals([result], block.field_box, GRID.shape_zyx, 1.0)


def test_the_reduce_refuses_a_file_that_is_not_an_array(tmp_path, block):
    uri = str(tmp_path / "residual.npy")
    open(uri, "wb").write(b"not an array at all")
    with pytest.raises(StorageError, match="residual.npy"):
        blend_residuals([BlockResult(block, OK, residual_uri=uri)], block.field_box,
                        GRID.shape_zyx, 1.0)


def test_the_reduce_uses_a_good_residual(tmp_path, block):
    uri = str(tmp_path / "residual.npy")
    open(uri, "wb").write(npy(good_residual(block, 0.25)))
    blended = blend_residuals([BlockResult(block, OK, residual_uri=uri)], block.field_box,
                              GRID.shape_zyx, 1.0)
    assert np.allclose(blended, 0.25)
