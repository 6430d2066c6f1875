"""The block store: every block's outcome kept on its own, next to its stage.

A block's entry is named by the hash of everything its outcome depends on (the block
key): both images' content versions, the level and grids, the stage's registration
method (its name and version) and settings, the identity of the previous field, the code
version and the block's regions. Nothing in the key names where OUT is, so a finished
OUT that is moved keeps its cache.

An entry is a residual (``<block>-<key>.npy``, when the block succeeded) and a record
(``<block>-<key>.json``), written in that order: the record commits the entry and holds
the residual's checksum. An entry whose record is missing or unreadable, or whose
residual is missing or does not match its checksum, is a miss: the block is registered
again, never reused on faith.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from dreg.errors import StorageError
from dreg.grid import region_to_list
from dreg.io import storage
from dreg.registration.outcome import OK, STATUSES, BlockResult, check_residual, residual_bytes
from dreg.registration.tiling import Block

RECORD_VERSION = 1


@dataclass(frozen=True)
class BlockKeyInputs:
    """What a block's outcome depends on, apart from the block itself. Locations under
    OUT (the store, logs, the previous field's path) are deliberately absent."""

    fixed_uri: str
    moving_uri: str
    fixed_version: str
    moving_version: str
    level: int
    grids: dict
    previous: str
    method: dict
    foreground: tuple[float, float]
    metric_guard: bool
    code_version: str


def block_key(inputs: BlockKeyInputs, block: Block) -> str:
    """The hash that names a block's entry in the store."""
    payload = {
        "inputs": asdict(inputs),
        "block": {"index": list(block.index), "padded": region_to_list(block.padded),
                  "field_box": region_to_list(block.field_box), "ramp": list(block.ramp)},
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def entry_uri(store_dir: str, block: Block, key: str, suffix: str) -> str:
    return storage.join(store_dir, f"{block.name}-{key}{suffix}")


def save_entry(store_dir: str, key: str, result: BlockResult,
               residual: np.ndarray | None) -> BlockResult:
    """Store a block's outcome: the residual first, then the record that commits it.
    Returns the result as the reduce step reads it (with its residual's location)."""
    record = {"version": RECORD_VERSION, "key": key, **result.row()}
    record.pop("reused")
    if residual is not None:
        data = residual_bytes(residual)
        uri = entry_uri(store_dir, result.block, key, ".npy")
        _write(uri, data)
        record["residual_sha256"] = hashlib.sha256(data).hexdigest()
        result = replace(result, residual_uri=uri)
    _write(entry_uri(store_dir, result.block, key, ".json"),
           json.dumps(record, indent=1).encode())
    return result


def _write(uri: str, data: bytes) -> None:
    try:
        storage.write_bytes(uri, data)
    except Exception as exc:  # noqa: BLE001 - one line naming the file and the cause
        raise StorageError(storage.describe_storage_failure(uri, exc),
                           transient=storage.is_transient(exc)) from None


def load_entry(store_dir: str, key: str, block: Block) -> BlockResult | None:
    """The stored outcome of a block, or None (a miss) when the store has no complete,
    intact, well-formed entry for this very key: a record that is not an object, lacks
    a field or holds a value of the wrong type, or a residual that does not match its
    checksum or is not a finite float32 array of the block's shape, is a miss."""
    try:
        record = json.loads(storage.read_text(entry_uri(store_dir, block, key, ".json")))
    except Exception:  # noqa: BLE001 - absent, partial or unreadable: register again
        return None
    parsed = _parse_record(record, key)
    if parsed is None:
        return None
    status, reason, metric_before, metric_after, seconds = parsed
    residual_uri = None
    if status == OK:
        residual_uri = entry_uri(store_dir, block, key, ".npy")
        try:
            data = storage.read_bytes(residual_uri)
        except Exception:  # noqa: BLE001 - as above
            return None
        if hashlib.sha256(data).hexdigest() != record.get("residual_sha256"):
            return None
        try:
            check_residual(np.load(io.BytesIO(data), allow_pickle=False), block,
                           residual_uri)
        except (StorageError, ValueError, OSError):  # not an array, or not this block's
            return None
    return BlockResult(block, status, reason, metric_before, metric_after, seconds,
                       residual_uri=residual_uri, reused=True)


def _number(value: object) -> bool:
    """Whether a record's value is a JSON number; a bool or a number written as text is
    not."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_record(record: object, key: str) -> tuple | None:
    """(status, reason, metric before, metric after, seconds) of a well-formed record of
    this key, else None."""
    if not isinstance(record, dict):
        return None
    if record.get("version") != RECORD_VERSION or record.get("key") != key:
        return None
    status, reason = record.get("status"), record.get("reason", "")
    if status not in STATUSES or not isinstance(reason, str):
        return None
    if status == OK and not isinstance(record.get("residual_sha256"), str):
        return None
    before, after = record.get("metric_before"), record.get("metric_after")
    seconds = record.get("seconds", 0.0)
    # A metric may be null (not measured) or even NaN (as elastix reported it); the
    # time a block took is a finite count of seconds.
    if not all(value is None or _number(value) for value in (before, after)):
        return None
    if not (_number(seconds) and math.isfinite(seconds) and seconds >= 0):
        return None
    return status, reason, before, after, float(seconds)

