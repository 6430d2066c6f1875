"""issue 18 item 5: a registration that lost OUT stops before its next write that
matters. Here another run takes OUT over while the blocks of the only stage register:
the run stops before creating the stage's field, naming it, and writes no field and no
result.json (the new owner's output is left alone)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from exact_registrar import METHOD

from dreg.grid import Grid
from dreg.io import ownership, storage
from dreg.io.ownership import LeaseLost
from dreg.io.ownership.records import record_name
from dreg.registration import PipelineConfig, StageConfig
from flows.options import RunOptions

PAIR = {"grid": Grid((32, 32, 32), (1.0, 1.0, 1.0)), "seed": 3, "amplitude_voxels": 1.0,
        "chunks": 16}
STAGES = [StageConfig(name="bspline", level=0, block_size=16, overlap=0.25,
                      transform="bspline", method=METHOD,
                      parameters={"MaximumNumberOfIterations": 10})]


def take_over(out: str, owner: str) -> None:
    """Another run (on another machine) takes OUT over: the next generation of the
    lease, live for a minute."""
    current = ownership.read_owner(out)
    generation = current["generation"] + 1
    now = time.time()
    record = {"owner": owner, "host": "elsewhere", "pid": 4242, "acquired": now,
              "renewed": now, "expires": now + 60, "token": uuid.uuid4().hex,
              "generation": generation, "released": None, "took_over_from": None}
    storage.write_text(storage.join(out, ownership.LEASE_DIR, record_name(generation)),
                       json.dumps(record))


def test_a_run_that_lost_out_writes_no_field(pair, tmp_path, dask_address, monkeypatch):
    import flows.registration as registration

    out = tmp_path / "out"
    register_blocks = registration.register_blocks

    def blocks_then_taken_over(*args, **kwargs):
        results = register_blocks(*args, **kwargs)
        take_over(str(out), "run-new-owner")
        return results

    monkeypatch.setattr(registration, "register_blocks", blocks_then_taken_over)
    with pytest.raises(LeaseLost, match="run-new-owner took it over") as lost:
        registration.register_images(fixed=pair["fixed"], moving=pair["moving"],
                                     out=str(out), pipeline=PipelineConfig(stages=STAGES),
                                     options=RunOptions(dask_address=dask_address, qc=False))
    assert "before creating the field" in str(lost.value)
    assert not (out / "field.ome.zarr").exists()
    assert not list(Path(out, "stages").glob("*/field-*.ome.zarr"))
    assert not (out / "result.json").exists()
    assert ownership.read_owner(str(out))["owner"] == "run-new-owner"
