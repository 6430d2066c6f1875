"""Block-wise registration: the pipeline model, the plan that validates and lays out a
run, the block grid, the block-registration seam (`method`; elastix is the built-in
method, `elastix` its ITK boundary), and one block's registration."""

from dreg.registration.block import StageContext, register_block
from dreg.registration.outcome import STATUSES, BlockResult
from dreg.registration.pipeline import (
    PipelineConfig,
    StageConfig,
    default_pipeline,
    load_pipeline,
)
from dreg.registration.plan import (
    RegistrationPlan,
    StagePlan,
    plan_registration,
    stage_context,
)
from dreg.registration.records import RegistrationResult, StageSummary
from dreg.registration.tiling import Block, tile

__all__ = [
    "STATUSES",
    "Block",
    "BlockResult",
    "PipelineConfig",
    "RegistrationPlan",
    "RegistrationResult",
    "StageConfig",
    "StageContext",
    "StagePlan",
    "StageSummary",
    "default_pipeline",
    "load_pipeline",
    "plan_registration",
    "register_block",
    "stage_context",
    "tile",
]
