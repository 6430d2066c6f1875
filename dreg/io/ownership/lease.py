"""What owning OUT means: a lease with a heartbeat, how it is taken, renewed, released
and judged stale, and the errors a run sees.

Clocks: a record's ``renewed`` and ``expires`` are written with the owner's clock, and
their difference is the lease's length. Another run judges the lease by storage's clock
alone: it is stale once the record's age (storage's time now minus the record's
modification time, as storage dated it) passes its length plus ``skew`` (CLOCK_SKEW_S),
so a host whose clock is ahead or behind neither takes over a live run early nor waits
for a dead one. The owner treats its lease as lost as soon as its own ``expires`` passes
without a renewal (measured from before its write: never later than others see it). A
record claiming a lease longer than MAX_LEASE_S is damaged. The lease reads the time,
and waits between renewals, through a `Clock`: this machine's and storage's, unless a
test passes its own.

An owner that provably died on this very machine (same host, boot and pid namespace; its
pid gone or another process's: `process.owner_is_gone`) is taken over at once, without
waiting for its lease to run out.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from dreg.errors import DregError, InputError, StorageError
from dreg.io import storage
from dreg.io.ownership.local import LocalBackend
from dreg.io.ownership.process import can_check, identity, owner_is_gone
from dreg.io.ownership.records import (
    LEASE_DIR,
    MAX_LEASE_S,
    MAX_ROUNDS,
    Backend,
    create,
    latest,
    prune,
    record_name,
)
from dreg.io.ownership.s3 import S3Backend
from dreg.trust import bounded_setting

CLOCK_SKEW_S = 5.0
DEFAULT_LEASE_S = 60.0
LEASE_VARIABLE = "DREG_LEASE_SECONDS"


class Clock:
    """Where the lease reads the time and waits between renewals: this machine's clock,
    and storage's clock for judging other runs' records. Tests pass a clock they move by
    hand (for both), so that expiry, staleness and renewal are exact and instant."""

    def now(self) -> float:
        """Seconds since the epoch, the unit of a record's times (this machine's)."""
        return time.time()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Wait `seconds`, or less if `stop` is set; whether it is set."""
        return stop.wait(seconds)

    def storage_now(self, backend: Backend) -> float:
        """Storage's time now, by the clock that dates its records."""
        return backend.now()

    def written(self, record: dict) -> float:
        """When storage says `record` was written (its modification time)."""
        return float(record["modified"])


SYSTEM_CLOCK = Clock()


class OwnedElsewhere(InputError):
    """OUT is owned by another run whose lease is live."""

    def __init__(self, uri: str, lease: dict, now: float | None = None):
        self.uri = uri
        self.lease = lease
        self.now = SYSTEM_CLOCK.now() if now is None else now
        super().__init__(describe_owner(uri, lease, self.now))

    def __reduce__(self):  # picklable (Prefect and Dask ship exceptions between processes)
        return (type(self), (self.uri, self.lease, self.now))


class LeaseLost(DregError):
    """This run no longer owns OUT (taken over, released, or not renewed in time)."""


def lease_length(lease: dict) -> float:
    """How long a record's lease lasts unless renewed: its expiry minus its renewal, both
    by its writer's clock (so neither's offset matters)."""
    return float(lease.get("expires") or 0.0) - float(
        lease.get("renewed") or lease.get("acquired") or 0.0)


def lease_age(lease: dict, now: float) -> float:
    """Seconds since the record was written, by storage's clock (`now` and the record's
    ``written`` time); a record without it (made by hand) is dated by its ``renewed``."""
    written = lease.get("written", lease.get("renewed") or lease.get("acquired") or 0.0)
    return now - float(written)


def describe_owner(uri: str, lease: dict, now: float | None = None) -> str:
    """'<OUT>: in use by run <id> (host h, pid p; lease renewed n s ago, expires in m s);
    wait for it to finish or stop it', with `now` storage's time. For an owner elsewhere
    (which cannot be checked from here), when OUT is free if that run is gone."""
    now = SYSTEM_CLOCK.now() if now is None else now
    if lease.get("unreadable"):
        return (
            f"{uri}: in use (its ownership record {LEASE_DIR}/"
            f"{record_name(lease['generation'])} is being written or is damaged); "
            "try again in a minute"
        )
    age = lease_age(lease, now)
    left = lease_length(lease) - age
    where = ", ".join(
        part
        for part in (
            f"host {lease['host']}" if lease.get("host") else "",
            f"pid {lease['pid']}" if lease.get("pid") else "",
        )
        if part
    )
    advice = "wait for it to finish or stop it"
    if not can_check(lease):  # its process cannot be checked from here: it may be gone
        advice += (f"; if it is no longer running, OUT is free in "
                   f"{max(0.0, left + CLOCK_SKEW_S):.0f} s")
    return (
        f"{uri}: in use by run {lease.get('owner')} ({where + '; ' if where else ''}"
        f"lease renewed {max(0.0, age):.0f} s ago, "
        f"expires in {max(0.0, left):.0f} s); {advice}"
    )


def describe_takeover(uri: str, lease: dict) -> str:
    """What a run says when it takes over OUT from a run whose process is gone."""
    return (f"{uri}: run {lease.get('owner')} (pid {lease.get('pid')} on this machine) is "
            "no longer running; taking over its output")


def is_stale(lease: dict, now: float | None = None, skew: float = CLOCK_SKEW_S) -> bool:
    """Whether a lease's owner missed its renewal: at `now` (storage's time), the record
    is older than its lease length plus `skew` seconds. A released lease is stale too."""
    if lease.get("released"):
        return True
    now = SYSTEM_CLOCK.now() if now is None else now
    return lease_age(lease, now) > lease_length(lease) + skew


def _observed(record: dict | None, clock: Clock) -> dict | None:
    """`record` with ``written``: when storage dated it, as `clock` tells."""
    if record is not None and "modified" in record:
        record["written"] = clock.written(record)
    return record


def read_owner(out_uri: str, clock: Clock = SYSTEM_CLOCK) -> dict | None:
    """The current lease record of OUT, or None if nobody holds it (never taken, or
    released). A stale lease is returned: check it with `is_stale` (against storage's
    time, `clock.storage_now`)."""
    uri = storage.normalize_uri(out_uri)
    _, _, record = latest(_backend(uri), uri)
    if record is None or record.get("released"):
        return None
    return _observed(record, clock)


def lease_seconds_setting() -> float:
    """How long a lease lasts unless renewed: DREG_LEASE_SECONDS, else 60 s. A shorter
    lease lets the next run take over a dead run's output sooner; every run on one
    output should use the same value. At most MAX_LEASE_S (an hour): a longer one would
    be a record others take for damaged (and 1e308 s broke the renewal thread)."""
    return bounded_setting(LEASE_VARIABLE, float, 3, MAX_LEASE_S,
                           f"a number of seconds, at least 3 and at most {MAX_LEASE_S:.0f}",
                           default=DEFAULT_LEASE_S)


def acquire(
    out_uri: str,
    owner: str,
    lease_seconds: float | None = None,
    *,
    skew_seconds: float = CLOCK_SKEW_S,
    clock: Clock = SYSTEM_CLOCK,
) -> Lease:
    """Take ownership of OUT for run `owner`, for `lease_seconds` (default:
    `lease_seconds_setting()`) unless renewed. `clock` gives the times written in the
    record and judges other runs' leases stale; the Lease keeps it for its renewals.

    Succeeds if OUT has no lease, if its lease was released or is stale (its owner died;
    it is taken over: `Lease.previous` is the stale record), if its owner provably died
    on this machine (taken over at once: `Lease.owner_gone`), or if it is held by the same
    run id (a retried flow: the earlier attempt loses its lease). Otherwise raises
    OwnedElsewhere naming the owner. Of concurrent callers exactly one wins.
    """
    if not isinstance(owner, str) or not owner.strip():
        raise InputError(f"invalid run id for the ownership of {out_uri}: {owner!r}")
    if lease_seconds is None:
        lease_seconds = lease_seconds_setting()
    if not 0 < lease_seconds <= MAX_LEASE_S:
        raise InputError(f"lease_seconds must be positive and at most {MAX_LEASE_S:.0f}, "
                         f"got {lease_seconds}")
    uri = storage.normalize_uri(out_uri)
    backend = _backend(uri)
    backend.check_atomic()
    token = uuid.uuid4().hex
    for _ in range(MAX_ROUNDS):
        generations, generation, record = latest(backend, uri)
        gone = False
        if record is not None and record.get("owner") != owner:
            gone = _refuse_unless_free(uri, backend, _observed(record, clock), clock,
                                       skew_seconds)
        now = clock.now()
        previous = None if record is None or record.get("released") else record
        new = {
            "owner": owner,
            **identity(),
            "acquired": now,
            "renewed": now,
            "expires": now + lease_seconds,
            "token": token,
            "generation": generation + 1,
            "released": None,
            "took_over_from": previous.get("owner") if previous else None,
        }
        if create(backend, uri, generation + 1, new):
            prune(backend, generations, generation + 1)
            return Lease(uri, new, lease_seconds, previous, clock, owner_gone=gone)
    raise StorageError(f"{uri}: could not take ownership: the ownership record keeps changing")


def _refuse_unless_free(uri: str, backend: Backend, record: dict, clock: Clock,
                        skew_seconds: float) -> bool:
    """Raise OwnedElsewhere if another run's `record` holds OUT: its lease is live (by
    storage's clock) and its process is not provably gone. Returns whether it is taken
    over because its process is gone (a live lease whose owner died on this machine)."""
    if record.get("released"):
        return False
    now = clock.storage_now(backend)
    if is_stale(record, now, skew_seconds):
        return False
    if not record.get("unreadable") and owner_is_gone(record):
        return True
    raise OwnedElsewhere(uri, record, now)


class Lease:
    """Ownership of OUT by one run: renew it (or use keep_alive), check it before
    committing results, release it when done. It stays in the process that took it
    (the flow), and is not pickled."""

    def __init__(
        self,
        uri: str,
        record: dict,
        lease_seconds: float,
        previous: dict | None,
        clock: Clock = SYSTEM_CLOCK,
        owner_gone: bool = False,
    ):
        self.uri = uri
        self.owner: str = record["owner"]
        self.token: str = record["token"]
        self.lease_seconds = lease_seconds
        self.record = dict(record)
        self.previous = previous
        # Taken over before the previous owner's lease ran out: its process was found
        # gone on this machine.
        self.owner_gone = owner_gone
        self.clock = clock
        self._lock = threading.Lock()
        self._released = False
        self._failure: BaseException | None = None
        self.last_error: BaseException | None = None

    @property
    def generation(self) -> int:
        return int(self.record["generation"])

    @property
    def expires(self) -> float:
        return float(self.record["expires"])

    def __repr__(self) -> str:
        return f"Lease({self.uri!r}, owner={self.owner!r}, expires={self.expires:.3f})"

    def _lost(self, record: dict | None, what: str) -> LeaseLost:
        if record is None:
            cause = "its ownership record was removed"
        elif record.get("released"):
            cause = f"run {record.get('owner')} released it"
        elif record.get("token") == self.token:
            cause = "it was changed by another process of this run"
        else:
            cause = f"run {record.get('owner')} took it over"
        return LeaseLost(f"{self.uri}: run {self.owner} no longer owns OUT ({what}: {cause})")

    def _is_mine(self, generation: int, record: dict | None) -> bool:
        return (
            generation == self.generation
            and record is not None
            and record.get("token") == self.token
            and not record.get("released")
        )

    def renew(self) -> None:
        """Extend the lease by lease_seconds from now, if this run still owns it; raise
        LeaseLost otherwise."""
        with self._lock:
            if self._released:
                raise LeaseLost(f"{self.uri}: run {self.owner} already released OUT")
            backend = _backend(self.uri)
            generations, generation, record = latest(backend, self.uri)
            if not self._is_mine(generation, record):
                raise self._lost(record, "renewal refused")
            now = self.clock.now()
            new = dict(self.record, renewed=now, expires=now + self.lease_seconds)
            new["generation"] = generation + 1
            if not create(backend, self.uri, generation + 1, new):
                _, _, record = latest(backend, self.uri)
                raise self._lost(record, "renewal refused")
            self.record = new
            prune(backend, generations, generation + 1)

    def release(self) -> None:
        """Give up ownership, if this run still holds it; otherwise do nothing."""
        with self._lock:
            if self._released:
                return
            self._released = True
            backend = _backend(self.uri)
            generations, generation, record = latest(backend, self.uri)
            if not self._is_mine(generation, record):
                return
            now = self.clock.now()
            tombstone = dict(self.record, released=now, expires=now)
            tombstone["generation"] = generation + 1
            if create(backend, self.uri, generation + 1, tombstone):
                self.record = tombstone
                prune(backend, generations, generation + 1)

    def check(self, before: str = "") -> None:
        """Raise LeaseLost if this run may no longer write to OUT: a renewal found the
        lease taken over, the renewer stopped, or the lease expired without being renewed.
        `before` names what the run was about to do (for the message). Reads no storage:
        cheap enough before every write."""
        stopped = f"; stopped before {before}" if before else ""
        if self._failure is not None:
            raise LeaseLost(f"{self._failure}{stopped}")
        if self._released:
            raise LeaseLost(f"{self.uri}: run {self.owner} already released OUT{stopped}")
        if self.clock.now() > self.expires:
            cause = f" ({storage.describe_storage_failure(self.uri, self.last_error)})"
            raise LeaseLost(
                f"{self.uri}: the ownership lease of run {self.owner} expired without "
                f"renewal{cause if self.last_error else ''}{stopped}"
            )

    def verify(self, before: str = "") -> None:
        """`check`, then read the lease from storage: raise LeaseLost if another run has
        taken it over (one read; for the steps between stages). A storage error here is
        left to the renewer, which retries until the lease expires."""
        self.check(before)
        # The generation known before the read: the renewer (another thread) may write a
        # newer one of ours while the read is under way, and a read that began before
        # that write shows the older one, which is still ours.
        known = self.generation
        try:
            generation_record = latest(_backend(self.uri), self.uri)
        except StorageError:
            return
        _, generation, record = generation_record
        if record is not None and record.get("token") == self.token and not record.get(
                "released") and generation >= known:
            return
        lost = self._lost(record, "checked before " + (before or "writing"))
        if self._failure is None:
            self._failure = lost
        raise lost

    def _renew_loop(self, stop: threading.Event, interval: float) -> None:
        try:
            self._renew_until(stop, interval)
        except BaseException as exc:  # noqa: BLE001 - a renewer that dies must be noticed
            if not self._released:
                self._failure = LeaseLost(
                    f"{self.uri}: the renewal of the ownership lease of run {self.owner} "
                    f"stopped: {type(exc).__name__}: {exc}")

    def _renew_until(self, stop: threading.Event, interval: float) -> None:
        while not self.clock.wait(stop, interval):
            try:
                self.renew()
                self.last_error = None
            except LeaseLost as exc:
                if not self._released:  # released in the block: not a failure
                    self._failure = exc
                return
            except Exception as exc:  # noqa: BLE001 - a transient failure: retried
                self.last_error = exc
                if self.clock.now() > self.expires:
                    self._failure = LeaseLost(
                        f"{self.uri}: could not renew the ownership lease of run "
                        f"{self.owner} before it expired: "
                        f"{storage.describe_storage_failure(self.uri, exc)}"
                    )
                    return

    @contextlib.contextmanager
    def keep_alive(self, interval: float | None = None) -> Iterator[Lease]:
        """Renew the lease every `interval` (lease_seconds / 3) in a daemon thread while
        the block runs, then release it. A lost lease is raised by `check()` in the block
        and on leaving it (unless the block raised already)."""
        interval = self.lease_seconds / 3 if interval is None else interval
        stop = threading.Event()
        thread = threading.Thread(
            target=self._renew_loop,
            args=(stop, interval),
            name=f"dreg-lease-{self.owner}",
            daemon=True,
        )
        thread.start()
        try:
            yield self
        except BaseException:
            stop.set()
            thread.join()
            with contextlib.suppress(Exception):
                self.release()
            raise
        stop.set()
        thread.join()
        if self._failure is not None:
            raise self._failure
        self.release()


def _backend(uri: str) -> Backend:
    return S3Backend(uri) if storage.is_s3(uri) else LocalBackend(uri)


def check_free(out_uri: str, *, clock: Clock = SYSTEM_CLOCK,
               tell: Callable[[str], None] | None = None) -> str | None:
    """Refuse at once, naming the owner, when another run holds a live lease on OUT, or
    when the lease length setting is bad: the fast check a command makes before it starts
    a server or a cluster. When the owner's lease is live but its process is gone from
    this machine (the command's run will take OUT over at once), says so: `tell` gets
    the line (default: ``dreg: <line>`` on stderr), which is also returned."""
    lease_seconds_setting()
    uri = storage.normalize_uri(out_uri)
    backend = _backend(uri)
    _, _, record = latest(backend, uri)
    if record is None or record.get("released"):
        return None
    if not _refuse_unless_free(uri, backend, _observed(record, clock), clock, CLOCK_SKEW_S):
        return None
    notice = describe_takeover(uri, record)
    if tell is None:
        print(f"dreg: {notice}", file=sys.stderr)
    else:
        tell(notice)
    return notice


def wait_until_free(out_uri: str, timeout_s: float, *, poll_s: float = 5.0,
                    clock: Clock = SYSTEM_CLOCK,
                    on_wait: Callable[[str], None] | None = None) -> float:
    """Wait while another run holds a live lease on OUT: until it releases it, its lease
    goes stale, or its process is provably gone from this machine. Returns the seconds
    waited (by `clock`); raises OwnedElsewhere, naming the owner, once `timeout_s` have
    passed. `on_wait` gets the owner's description once, when the wait begins. For a
    second request of work that a run is already doing: it waits for that run's result
    rather than failing, and takes over (resuming from what was stored) if that run dies."""
    stop = threading.Event()
    started = clock.now()
    told = on_wait is None
    while True:
        try:
            check_free(out_uri, clock=clock, tell=lambda _line: None)
            return clock.now() - started
        except OwnedElsewhere as exc:
            waited = clock.now() - started
            if waited >= timeout_s:
                raise
            if not told:
                on_wait(str(exc))
                told = True
            clock.wait(stop, min(poll_s, timeout_s - waited))
