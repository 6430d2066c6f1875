"""The scheduled batch flow: every pending pair of a manifest."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from exact_registrar import METHOD

from dreg import synth
from dreg.errors import InputError
from dreg.grid import Grid
from dreg.registration import PipelineConfig, StageConfig
from flows.batch import pending, read_manifest
from flows.options import RunOptions


def test_manifest_reading_and_pending(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "result.json").write_text("{}")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump([
        {"fixed": "/f", "moving": "/m1", "out": str(done)},
        {"fixed": "/f", "moving": "/m2", "out": str(tmp_path / "todo")},
    ]))
    assert [e["moving"] for e in pending(read_manifest(str(manifest)))] == ["/m2"]
    manifest.write_text(json.dumps([{"fixed": "/f"}]))
    with pytest.raises(InputError, match="list of"):
        read_manifest(str(manifest))


@pytest.mark.slow
def test_scheduled_run_registers_only_pending_pairs(tmp_path, dask_address):
    from flows.batch import register_scheduled

    pair = synth.write_pair(str(tmp_path / "pair"), Grid((32, 32, 32), (1.0, 1.0, 1.0)),
                            seed=4)
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "result.json").write_text("{}")
    manifest = tmp_path / "nightly.yaml"
    manifest.write_text(yaml.safe_dump([
        {"fixed": pair["fixed"], "moving": pair["moving"], "out": str(finished)},
        {"fixed": pair["fixed"], "moving": pair["moving"], "out": str(tmp_path / "new")},
    ]))
    pipeline = PipelineConfig(stages=[StageConfig(
        name="t", level=0, transform="translation", method=METHOD,
        parameters={"MaximumNumberOfIterations": 20})])
    outcomes = register_scheduled(manifest=str(manifest), pipeline=pipeline,
                                  options=RunOptions(dask_address=dask_address, qc=False))
    assert outcomes == [{"out": str(tmp_path / "new"),
                         "field": str(tmp_path / "new" / "field.ome.zarr")}]
    assert (tmp_path / "new" / "result.json").exists()
    assert (finished / "result.json").read_text() == "{}"


@pytest.mark.parametrize("entry, prefixes, message", [
    ({"moving": "s3://key:secret@landing/m.ome.zarr"}, "", "entry 1 moving: not a valid s3://"),
    ({"fixed": "relative/f.ome.zarr"}, "", "entry 1 fixed: a local path must be absolute"),
    ({"out": "http://elsewhere/out"}, "", "entry 1 out: scheme 'http' is not allowed"),
    ({"moving": "s3://landing/../m"}, "", "'..' is not allowed"),
    ({"moving": 17}, "", "entry 1 moving: missing"),
    ({"moving": "s3://other/m.ome.zarr"}, "s3://landing/,/data",
     "entry 1 moving: s3://other/m.ome.zarr is outside the allowed prefixes"),
    ({"out": "/etc/out"}, "s3://landing/,/data", "entry 1 out: /etc/out is outside"),
])
def test_manifest_entries_are_validated_like_an_event(tmp_path, monkeypatch, entry, prefixes,
                                                      message):
    """issue 18 item 7: the nightly manifest is read from storage others may write; its
    entries are checked as an event's parameters are, against the worker's
    DREG_ALLOWED_PREFIXES where set."""
    monkeypatch.setenv("DREG_ALLOWED_PREFIXES", prefixes)
    good = {"fixed": "s3://landing/f.ome.zarr", "moving": "s3://landing/m.ome.zarr",
            "out": "s3://landing/out/m"}
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump([{**good, **entry}]))
    with pytest.raises(InputError, match=re.escape(message)):
        read_manifest(str(manifest))
    manifest.write_text(yaml.safe_dump([good]))
    assert read_manifest(str(manifest)) == [good]


def test_a_manifest_with_aliases_is_refused(tmp_path):
    """issue 18 (bad input): a YAML alias bomb in a manifest is refused unexpanded."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text("- &e {fixed: /f, moving: /m, out: /o}\n- *e\n")
    with pytest.raises(InputError, match="aliases and anchors"):
        read_manifest(str(manifest))
