"""issue 18 item 4: the trust boundary of runs started through the API is the worker's
environment, not a run parameter: the limits of an event's run (reference, output
prefix, allowed prefixes, voxel limit, pipeline) and the Dask cluster."""

from __future__ import annotations

import pytest

from dreg.errors import InputError
from flows.ingest import DEFAULT_MAX_VOXELS, IngestSettings
from flows.options import RunOptions, check_run_options


def test_settings_come_from_the_environment(tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("stages:\n  - name: t\n    level: 0\n    transform: translation\n")
    settings = IngestSettings.from_environment({
        "DREG_REFERENCE": "s3://atlas/ref.ome.zarr", "DREG_OUT_PREFIX": "s3://results/r",
        "DREG_ALLOWED_PREFIXES": "s3://landing/a/, s3://landing/b/",
        "DREG_MAX_VOXELS": "1000", "DREG_PIPELINE": str(pipeline)})
    assert settings.reference == "s3://atlas/ref.ome.zarr"
    assert settings.out_prefix == "s3://results/r"
    assert settings.allowed_prefixes == ["s3://landing/a/", "s3://landing/b/"]
    assert settings.max_voxels == 1000
    assert [s.name for s in settings.pipeline.stages] == ["t"]
    empty = IngestSettings.from_environment({})
    assert empty.allowed_prefixes == [] and empty.max_voxels == DEFAULT_MAX_VOXELS
    assert empty.pipeline is None


@pytest.mark.parametrize("value", ["lots", "0", "-3", "1.5"])
def test_a_bad_voxel_limit_is_refused_naming_the_variable(value):
    with pytest.raises(InputError, match=f"DREG_MAX_VOXELS={value!r}"):
        IngestSettings.from_environment({"DREG_MAX_VOXELS": value})


def test_a_run_parameter_only_narrows_the_voxel_limit():
    settings = IngestSettings.from_environment({"DREG_MAX_VOXELS": "1000"})
    assert settings.narrowed(None).max_voxels == 1000
    assert settings.narrowed(10).max_voxels == 10
    assert settings.narrowed(2**60).max_voxels == 1000  # never widened
    for bad in (0, -1, True, "5"):
        with pytest.raises(InputError, match="max_voxels"):
            settings.narrowed(bad)


def test_a_run_parameter_may_not_name_a_dask_cluster(monkeypatch):
    monkeypatch.delenv("DREG_DASK_ADDRESS", raising=False)
    assert check_run_options(None) == RunOptions()
    with pytest.raises(InputError, match="options.dask_address: a deployment's run uses the "
                                         "worker's Dask cluster"):
        check_run_options(RunOptions(dask_address="tcp://198.51.100.7:8786"))
    monkeypatch.setenv("DREG_DASK_ADDRESS", "tcp://10.0.0.5:8786")
    with pytest.raises(InputError, match="options.dask_address"):
        check_run_options(RunOptions(dask_address="tcp://198.51.100.7:8786"))
    same = RunOptions(dask_address="tcp://10.0.0.5:8786")  # the worker's own: allowed
    assert check_run_options(same) is same


def test_an_ingest_run_cannot_widen_its_limits(prefect_api, tmp_path, monkeypatch):
    """A run started with its own Dask address, or for a volume outside the worker's
    allowed prefixes, is rejected before anything is read or written; no parameter
    names other prefixes."""
    from flows.ingest import register_on_ingest

    monkeypatch.setenv("DREG_ALLOWED_PREFIXES", str(tmp_path / "landing"))
    monkeypatch.setenv("DREG_OUT_PREFIX", str(tmp_path / "results"))
    monkeypatch.setenv("DREG_REFERENCE", str(tmp_path / "landing" / "ref.ome.zarr"))
    monkeypatch.delenv("DREG_DASK_ADDRESS", raising=False)
    with pytest.raises(InputError, match="options.dask_address"):
        register_on_ingest(moving=str(tmp_path / "landing" / "m.ome.zarr"),
                           options=RunOptions(dask_address="tcp://198.51.100.7:8786"))
    with pytest.raises(InputError, match="outside the allowed prefixes"):
        register_on_ingest(moving=str(tmp_path / "elsewhere" / "m.ome.zarr"))
    with pytest.raises(TypeError):
        register_on_ingest(moving=str(tmp_path / "elsewhere" / "m.ome.zarr"),
                           allowed_prefixes=[str(tmp_path)])
    assert not (tmp_path / "results").exists()


def test_runs_started_from_any_deployment_use_the_workers_cluster(monkeypatch):
    """The nightly batch and the warp deployment take RunOptions too: started from a
    deployment, their options may not name a cluster; called by a program, they may."""
    import prefect.runtime.deployment as deployment

    from flows.options import checked_for_deployment

    monkeypatch.delenv("DREG_DASK_ADDRESS", raising=False)
    named = RunOptions(dask_address="tcp://198.51.100.7:8786")
    monkeypatch.setattr(deployment, "get_id", lambda: None)
    assert checked_for_deployment(named) is named
    monkeypatch.setattr(deployment, "get_id", lambda: "a-deployment-id")
    with pytest.raises(InputError, match="options.dask_address"):
        checked_for_deployment(named)
    assert checked_for_deployment(None) == RunOptions()
