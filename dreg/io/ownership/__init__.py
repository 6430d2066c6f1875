"""One run at a time owns OUT: a lease with a heartbeat, on local disk and on S3.

A run takes a lease on its output location before writing anything and renews it while
it runs. A second run on the same OUT is refused with the owner's run id; a lease whose
owner died (no renewal past its expiry, by storage's clock) is stale and is taken over,
and so, at once, is the lease of an owner that provably died on this very machine.

Layout: ``OUT/.dreg-owner/<generation>.json``, one small immutable JSON record per
change of the lease (taken, renewed, released)::

    {"owner": <run id>, "host": ..., "pid": ..., "boot_id": ..., "pid_namespace": ...,
     "pid_start": <clock ticks since boot>, "acquired": <unix time>,
     "renewed": <unix time>, "expires": <unix time>, "token": <uuid>,
     "generation": <n>, "released": <unix time or null>, "took_over_from": <run id or null>}

The record with the highest generation is the lease. Every change is a compare-and-swap
done with the one atomic primitive both backends share, *create if absent*: whoever read
generation n and wants to change the lease creates generation n + 1, and of any number of
takers, renewers and releasers that read n, exactly one creates n + 1; the others see it
on their next read. Generations only grow (the latest is never deleted, a release writes
a tombstone), so a record read long ago cannot be mistaken for the current one. Older
generations are pruned.

Modules: `lease` (what owning OUT means, staleness by storage's clock, the errors),
`records` (the records and the compare-and-swap over them), `process` (whether an owner
on this very machine is gone), `local` and `s3` (the two backends of *create if absent*:
a hard link on disk, ``PutObject`` with ``If-None-Match: *`` on S3).
"""

from dreg.io.ownership.lease import (
    CLOCK_SKEW_S,
    DEFAULT_LEASE_S,
    LEASE_VARIABLE,
    Clock,
    Lease,
    LeaseLost,
    OwnedElsewhere,
    acquire,
    check_free,
    describe_owner,
    describe_takeover,
    is_stale,
    lease_seconds_setting,
    read_owner,
    wait_until_free,
)
from dreg.io.ownership.local import TEMPORARY_MAX_AGE_S
from dreg.io.ownership.process import owner_is_gone
from dreg.io.ownership.records import (
    KEEP_GENERATIONS,
    LEASE_DIR,
    MAX_LEASE_S,
    MAX_ROUNDS,
    UNREADABLE_GRACE_S,
)

__all__ = [
    "CLOCK_SKEW_S",
    "DEFAULT_LEASE_S",
    "KEEP_GENERATIONS",
    "LEASE_DIR",
    "LEASE_VARIABLE",
    "MAX_LEASE_S",
    "MAX_ROUNDS",
    "TEMPORARY_MAX_AGE_S",
    "UNREADABLE_GRACE_S",
    "Clock",
    "Lease",
    "LeaseLost",
    "OwnedElsewhere",
    "acquire",
    "check_free",
    "describe_owner",
    "describe_takeover",
    "is_stale",
    "lease_seconds_setting",
    "owner_is_gone",
    "read_owner",
    "wait_until_free",
]
