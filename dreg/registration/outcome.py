"""What one block's registration leaves behind: a status, a reason, metrics and, when it
succeeded, its residual displacement stored next to the stage.

Kept apart from the registration steps so that the reduce step can read outcomes
without depending on elastix or on how a block is registered.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from dreg.errors import StorageError
from dreg.grid import region_shape, region_to_list
from dreg.io import storage
from dreg.registration.tiling import Block

OK = "ok"
SKIPPED_EMPTY = "skipped_empty"
OUTSIDE_MOVING = "outside_moving"
REJECTED_METRIC = "rejected_metric"
FAILED = "failed"
STATUSES = (OK, SKIPPED_EMPTY, OUTSIDE_MOVING, REJECTED_METRIC, FAILED)


@dataclass(frozen=True)
class BlockResult:
    """The outcome of one block: small, plain, and enough for the reduce step."""

    block: Block
    status: str
    reason: str = ""
    metric_before: float | None = None
    metric_after: float | None = None
    seconds: float = 0.0
    residual_uri: str | None = None
    reused: bool = False  # taken from the block store, not registered in this run

    def row(self) -> dict:
        """One row of the stage's block table."""
        return {
            "index": list(self.block.index),
            "region": region_to_list(self.block.padded),
            "status": self.status,
            "reason": self.reason,
            "metric_before": self.metric_before,
            "metric_after": self.metric_after,
            "seconds": round(self.seconds, 3),
            "reused": self.reused,
        }


def residual_bytes(residual: np.ndarray) -> bytes:
    """A residual, (3, z, y, x) float32 on its block's share of the field grid, as the
    bytes of a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, residual.astype(np.float32))
    return buffer.getvalue()


def save_residual(uri: str, residual: np.ndarray) -> None:
    storage.write_bytes(uri, residual_bytes(residual))


def load_residual(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)))


def check_residual(residual: object, block: Block, uri: str, values: bool = True) -> None:
    """Raise StorageError naming `uri` unless `residual` is what a block's residual must be
    to be used: a float32 array (3, z, y, x) of the block's field box, every value finite
    (unless `values` is off: the caller checks the part it uses). The reduce's compiled
    loops index it by the block's box: a smaller array would be read past its end."""
    expected = (3, *region_shape(block.field_box))
    if not isinstance(residual, np.ndarray):
        raise StorageError(f"{uri}: not a block residual (not an array)", transient=False)
    if residual.dtype != np.float32 or tuple(residual.shape) != expected:
        raise StorageError(f"{uri}: a block residual must be float32 of shape {expected}, "
                           f"found {residual.dtype} of shape {tuple(residual.shape)}",
                           transient=False)
    if values:
        check_finite(residual, uri)


def check_finite(residual: np.ndarray, uri: str) -> None:
    """Raise StorageError naming `uri` if (part of) a residual holds NaN or infinity."""
    if not np.isfinite(residual).all():
        raise StorageError(f"{uri}: the block residual holds values that are not finite",
                           transient=False)
