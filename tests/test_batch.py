"""The scheduled batch flow: every pending pair of a manifest."""

from __future__ import annotations

import json

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
                                  options=RunOptions(dask_address=dask_address))
    assert outcomes == [{"out": str(tmp_path / "new"),
                         "field": str(tmp_path / "new" / "field.ome.zarr")}]
    assert (tmp_path / "new" / "result.json").exists()
    assert (finished / "result.json").read_text() == "{}"
