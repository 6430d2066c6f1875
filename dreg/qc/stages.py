"""Per stage: blocks by status, and how much each block's registration gained.

The gain of a block is its similarity metric after registration minus before (the
registration's normalized mutual information: above 0 the block got more alike). A
block without both numbers (skipped, outside the moving image, failed) has no gain.
"""

from __future__ import annotations

import json

import numpy as np

from dreg.io import storage
from dreg.qc.plan import StageRef
from dreg.registration.outcome import STATUSES

GAIN_PERCENTILES = (5, 25, 50, 75, 95)


def read_table(stage: StageRef) -> list[dict]:
    """The stage's block table (rows: index, region, status, reason, metrics, seconds);
    empty when the stage left none."""
    if not storage.exists(stage.table):
        return []
    return json.loads(storage.read_text(stage.table))


def gains(rows: list[dict]) -> np.ndarray:
    """metric_after - metric_before of every block that has both."""
    values = [r["metric_after"] - r["metric_before"] for r in rows
              if r.get("metric_after") is not None and r.get("metric_before") is not None]
    return np.asarray(values, dtype=float)


def gain_distribution(values: np.ndarray) -> dict | None:
    """Count, mean, extremes, percentiles and the share of blocks that improved."""
    if values.size == 0:
        return None
    percentiles = np.percentile(values, GAIN_PERCENTILES)
    return {
        "blocks": int(values.size),
        "mean": float(values.mean()),
        "min": float(values.min()),
        **{f"p{p:02d}": float(v) for p, v in zip(GAIN_PERCENTILES, percentiles, strict=True)},
        "max": float(values.max()),
        "improved_share": float(np.mean(values > 0)),
    }


def stage_numbers(stage: StageRef, rows: list[dict]) -> dict:
    """One stage's part of qc.json."""
    counts = {status: 0 for status in STATUSES}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    if not rows:
        counts.update(stage.counts)
    return {"number": stage.number, "name": stage.name, "level": stage.level,
            "transform": stage.transform, "blocks": len(rows) or stage.blocks,
            "counts": counts, "metric_gain": gain_distribution(gains(rows))}
