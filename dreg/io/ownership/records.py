"""The lease's records and the compare-and-swap over them, the same on every backend.

A lease is a series of immutable JSON records ``OUT/.dreg-owner/<generation>.json``; the
highest generation is the lease. A backend offers one atomic primitive, *create if
absent* (`Backend.create`); whoever read generation n and wants to change the lease
creates n + 1, and of any number of writers that read n exactly one succeeds.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time

from dreg.errors import StorageError

LEASE_DIR = ".dreg-owner"
# A record that cannot be parsed (only possible on file systems without hard links, while
# its writer is between create and write, or after outside damage) counts as held this long
# after it was last modified.
UNREADABLE_GRACE_S = 30.0
# Compare-and-swap rounds before giving up on a location that keeps changing under us.
MAX_ROUNDS = 20
KEEP_GENERATIONS = 2
# The longest lease there may be (DREG_LEASE_SECONDS is bounded by it): a record that
# claims a longer one is damaged, not a run to wait for.
MAX_LEASE_S = 3600.0

GENERATION = re.compile(r"^(\d+)\.json$")


def record_name(generation: int) -> str:
    """The file name of one generation's record, e.g. ``000000000007.json``."""
    return f"{generation:012d}.json"


class Backend:
    """The storage of one OUT's lease records (local disk or S3)."""

    def generations(self) -> list[int]:
        raise NotImplementedError

    def read(self, generation: int) -> tuple[bytes, float] | None:
        """The record's bytes and modification time, or None if it does not exist."""
        raise NotImplementedError

    def create(self, generation: int, data: bytes) -> bool:
        """Create the record if it does not exist; False if it does."""
        raise NotImplementedError

    def delete(self, generation: int) -> None:
        raise NotImplementedError

    def now(self) -> float:
        """The storage's clock now (seconds since the epoch): the clock that dates its
        records' modification times."""
        return time.time()

    def check_atomic(self) -> None:
        """Raise StorageError if `create` cannot be atomic here."""

    def clean_temporary(self) -> None:
        """Remove leftovers of writers that died."""


def parse(generation: int, data: bytes, modified: float) -> dict:
    """A generation's record, with ``modified``: when storage says it was written (its
    modification time, storage's clock). A record that cannot be parsed, or that is
    damaged (fields of the wrong type, a lease longer than MAX_LEASE_S), is held by
    nobody in particular until UNREADABLE_GRACE_S after its modification time."""
    try:
        record = json.loads(data)
        if not isinstance(record, dict) or not record.get("token"):
            raise ValueError("not a lease record")
        if not well_formed(record):
            raise ValueError("a damaged lease record")
    except ValueError:
        return {
            "owner": None,
            "unreadable": True,
            "generation": generation,
            "renewed": modified,
            "expires": modified + UNREADABLE_GRACE_S,
            "modified": modified,
        }
    record["generation"] = generation
    record["modified"] = modified
    return record


def _number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def well_formed(record: dict) -> bool:
    """Whether a parsed record has what judging it needs: a run id, a token, finite
    times, and a lease length (expires - renewed, both by its writer's clock) within
    (0, MAX_LEASE_S] unless it is released."""
    if not isinstance(record.get("owner"), str) or not isinstance(record.get("token"), str):
        return False
    if not all(_number(record.get(name)) for name in ("renewed", "expires")):
        return False
    if record.get("released") not in (None, False) and not _number(record["released"]):
        return False
    length = float(record["expires"]) - float(record["renewed"])
    return bool(record.get("released")) or 0 < length <= MAX_LEASE_S


def latest(backend: Backend, uri: str) -> tuple[list[int], int, dict | None]:
    """(all generations, the highest, its record); (…, 0, None) if there is none."""
    for _ in range(MAX_ROUNDS):
        generations = backend.generations()
        if not generations:
            return generations, 0, None
        generation = max(generations)
        found = backend.read(generation)
        if found is None:  # pruned after a newer one appeared: look again
            continue
        return generations, generation, parse(generation, *found)
    raise StorageError(f"{uri}: the ownership record keeps changing while being read")


def create(backend: Backend, uri: str, generation: int, record: dict) -> bool:
    """Create a generation unless it exists. True if ours is there (also when a retried
    request finds the record its own lost first attempt created)."""
    data = json.dumps(record, indent=1).encode()
    if backend.create(generation, data):
        return True
    found = backend.read(generation)
    return found is not None and found[0] == data


def prune(backend: Backend, generations: list[int], current: int) -> None:
    """Delete generations older than the last KEEP_GENERATIONS (best effort)."""
    for generation in generations:
        if generation <= current - KEEP_GENERATIONS:
            with contextlib.suppress(Exception):
                backend.delete(generation)
    with contextlib.suppress(Exception):
        backend.clean_temporary()
