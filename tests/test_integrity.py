"""Faults that used to end in a green run over a wrong field: damaged input chunks, an
input changed mid-run, a previous field that is not the one planned from. The exact
registrar (these are about the data, not the registration), Prefect's test harness and
the session's LocalCluster."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from exact_registrar import METHOD

from dreg.errors import RunFailed, StorageError
from dreg.grid import Grid
from dreg.io import ome_zarr
from dreg.registration import PipelineConfig, StageConfig
from flows.options import RunOptions

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

STAGES = [StageConfig(name="bspline", level=0, block_size=24, overlap=0.25,
                      transform="bspline", method=METHOD,
                      parameters={"MaximumNumberOfIterations": 30})]


def run(pair: dict, out: Path, dask_address: str, **options):
    from flows.registration import register_images

    return register_images(fixed=pair["fixed"], moving=pair["moving"], out=str(out),
                           pipeline=PipelineConfig(stages=STAGES),
                           options=RunOptions(dask_address=dask_address, qc=False, **options))


PAIR = {"grid": Grid((48, 48, 48), (1.0, 1.0, 1.0)), "seed": 7, "amplitude_voxels": 1.5,
        "chunks": 16}


@pytest.fixture
def own_pair(pair, tmp_path):
    """A copy of the module's pair that a test may damage."""
    copy = tmp_path / "pair"
    shutil.copytree(Path(pair["fixed"]).parent, copy)
    return {role: str(copy / Path(pair[role]).name) for role in ("fixed", "moving")}


def chunk_file(image_uri: str, level: int, index: tuple[int, int, int]) -> Path:
    path = ome_zarr.open_image(image_uri).level(level).path
    return Path(image_uri, path, "c", *map(str, index))


@pytest.mark.parametrize("damage", ["garbage", "directory"])
def test_a_damaged_input_chunk_fails_the_run_naming_it(own_pair, tmp_path, dask_address,
                                                         damage):
    pair = own_pair
    chunk = chunk_file(pair["moving"], 0, (1, 1, 1))
    chunk.unlink()
    if damage == "garbage":
        chunk.write_bytes(b"\x00not a chunk\xff" * 40)
    else:
        chunk.mkdir()
    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        run(pair, tmp_path / "out", dask_address, storage_patience=600)
    seconds = time.monotonic() - started
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{pair['moving']}: level 0 (array '0'), chunk (1, 1, 1) (z, y, x)")
    # Broken data is not waited on: the patience is for storage that does not answer.
    assert seconds < 300
    assert not (tmp_path / "out/result.json").exists()


def test_an_input_chunk_deleted_mid_run_fails_the_run(own_pair, tmp_path, dask_address):
    pair = own_pair
    out = tmp_path / "out"
    store = out / "stages/1-bspline/blocks"
    deleted = threading.Event()

    def delete_once_a_block_is_stored():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if store.exists() and any(store.glob("*.json")):
                chunk_file(pair["moving"], 0, (2, 2, 2)).unlink()
                deleted.set()
                return
            time.sleep(0.05)

    saboteur = threading.Thread(target=delete_once_a_block_is_stored, daemon=True)
    saboteur.start()
    with pytest.raises(RunFailed, match=r"the moving image .* changed during the run"):
        run(pair, out, dask_address, batch_size=1)
    saboteur.join(timeout=10)
    assert deleted.is_set()
    assert not (out / "result.json").exists()


def test_chunks_absent_from_the_start_keep_their_fill_value(own_pair, tmp_path,
                                                             dask_address):
    pair = own_pair
    chunk_file(pair["moving"], 0, (2, 2, 2)).unlink()
    result = run(pair, tmp_path / "out", dask_address)
    assert (tmp_path / "out/result.json").exists()
    assert result.block_counts["bspline"].get("ok", 0) > 0


def test_a_previous_field_that_is_not_the_planned_one_is_refused(pair, tmp_path,
                                                                 dask_address):
    """The next stage reads the previous stage's field only if it carries the identity
    the stage was planned from; a field rewritten under the same name is refused."""
    from dreg.io import completion
    from dreg.registration.block import open_previous
    from dreg.registration.plan import plan_registration, stage_context

    stages = [StageConfig(name="affine", level=-1, transform="affine", method=METHOD,
                          parameters={"MaximumNumberOfIterations": 50}), *STAGES]
    from flows.registration import register_images

    result = register_images(fixed=pair["fixed"], moving=pair["moving"],
                             out=str(tmp_path / "out"), pipeline=PipelineConfig(stages=stages),
                             options=RunOptions(dask_address=dask_address, qc=False))
    first = result.stages[0]
    plan = plan_registration(pair["fixed"], pair["moving"], str(tmp_path / "out"),
                             PipelineConfig(stages=stages), overwrite=True)
    ctx = stage_context(plan, plan.stages[1], first.field, first.identity)
    open_previous(ctx)  # the planned field opens
    completion.mark_complete(first.field, "another-identity")
    with pytest.raises(StorageError, match="not the complete field this stage was planned"):
        open_previous(ctx)
    stage_json = json.loads((tmp_path / "out/stages/1-affine/stage.json").read_text())
    # issue 18 item 1: stage.json names the stage's field relative to OUT.
    assert stage_json["field"] == f"stages/1-affine/{Path(first.field).name}"
    assert str(tmp_path / "out" / stage_json["field"]) == first.field
    assert np.isfinite(stage_json["field_voxels"])
