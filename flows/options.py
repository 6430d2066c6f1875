"""How a run goes, as opposed to what it computes (that is the pipeline): the cluster,
retries, patience with storage, the share of failed blocks a run tolerates, QC.

The CLI's options and their defaults come from this model's fields.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from dreg.errors import InputError

ADDRESS_VARIABLE = "DREG_DASK_ADDRESS"  # as flows.cluster reads it
# A local cluster's workers are processes on this machine; more than this is a typo.
MAX_WORKERS = 256
MAX_RETRIES = 100
MAX_STORAGE_PATIENCE_S = 7 * 24 * 3600.0


class RunOptions(BaseModel):
    """How a registration runs, as opposed to what it computes (that is the pipeline)."""

    model_config = ConfigDict(extra="forbid")

    overwrite: bool = Field(False, description="replace a finished result in the output")
    dask_address: str | None = Field(
        None, description="an existing Dask scheduler; default $DREG_DASK_ADDRESS, else local"
    )
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS,
                                description="local cluster workers (default: cores)")
    debug: bool = Field(False, description="write elastix logs per block")
    show_progress: bool = Field(False, description="a progress bar of blocks on stderr")
    block_retries: int = Field(2, ge=0, le=MAX_RETRIES,
                               description="attempts after a batch's first failure")
    storage_patience: float = Field(
        300.0, ge=0, le=MAX_STORAGE_PATIENCE_S, allow_inf_nan=False,
        description="seconds to keep retrying a storage error before the run fails")
    max_failed_share: float = Field(
        0.05, ge=0, le=1, allow_inf_nan=False,
        description="a stage with a larger share of failed blocks fails the run")
    batch_size: int | None = Field(
        None, ge=1, description="blocks per task run (default: sized from blocks and workers)")
    qc: bool = Field(True, description="run quality control at the end (OUT/qc/)")


def check_run_options(options: RunOptions | None) -> RunOptions:
    """The options of a run that an API user may have started (a deployment's): the Dask
    cluster is the worker's (DREG_DASK_ADDRESS, or a local one), never one named by a run
    parameter, since the flow runs what the scheduler returns. InputError otherwise."""
    options = options or RunOptions()
    if options.dask_address and options.dask_address != os.environ.get(ADDRESS_VARIABLE):
        raise InputError("options.dask_address: a deployment's run uses the worker's Dask "
                         f"cluster ({ADDRESS_VARIABLE}); a run parameter may not name one")
    return options


def checked_for_deployment(options: RunOptions | None) -> RunOptions:
    """`check_run_options` when this flow run (or the run it belongs to) was started from
    a deployment, i.e. possibly by anyone who can reach the API; the options as given
    when it was called in a program or by the CLI."""
    from prefect.runtime import deployment

    options = options or RunOptions()
    return check_run_options(options) if deployment.get_id() else options
