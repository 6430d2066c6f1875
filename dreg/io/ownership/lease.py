"""What owning OUT means: a lease with a heartbeat, how it is taken, renewed, released
and judged stale, and the errors a run sees.

Clocks: ``expires`` is written with the owner's clock; another run treats the lease as
stale only ``skew`` seconds after that (CLOCK_SKEW_S), and the owner treats it as lost as
soon as ``expires`` passes without a renewal. The lease reads the time, and waits
between renewals, through a `Clock`: this machine's unless a test passes its own. (An
unreadable record's age comes from its modification time: storage's clock.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from dreg.errors import DregError, InputError, StorageError
from dreg.io import storage
from dreg.io.ownership.local import LocalBackend
from dreg.io.ownership.records import (
    LEASE_DIR,
    MAX_ROUNDS,
    Backend,
    create,
    latest,
    prune,
    record_name,
)
from dreg.io.ownership.s3 import S3Backend

CLOCK_SKEW_S = 5.0
DEFAULT_LEASE_S = 60.0
LEASE_VARIABLE = "DREG_LEASE_SECONDS"


class Clock:
    """Where the lease reads the time and waits between renewals: this machine's clock.
    Tests pass a clock they move by hand, so that expiry and renewal are exact and
    instant."""

    def now(self) -> float:
        """Seconds since the epoch, the unit of a record's times."""
        return time.time()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Wait `seconds`, or less if `stop` is set; whether it is set."""
        return stop.wait(seconds)


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


def describe_owner(uri: str, lease: dict, now: float | None = None) -> str:
    """'<OUT>: in use by run <id> (host h, pid p; lease renewed n s ago, expires in m s);
    wait for it to finish or stop it'."""
    now = SYSTEM_CLOCK.now() if now is None else now
    if lease.get("unreadable"):
        return (
            f"{uri}: in use (its ownership record {LEASE_DIR}/"
            f"{record_name(lease['generation'])} is being written or is damaged); "
            "try again in a minute"
        )
    renewed = float(lease.get("renewed") or lease.get("acquired") or 0.0)
    expires = float(lease.get("expires") or 0.0)
    where = ", ".join(
        part
        for part in (
            f"host {lease['host']}" if lease.get("host") else "",
            f"pid {lease['pid']}" if lease.get("pid") else "",
        )
        if part
    )
    return (
        f"{uri}: in use by run {lease.get('owner')} ({where + '; ' if where else ''}"
        f"lease renewed {max(0.0, now - renewed):.0f} s ago, "
        f"expires in {max(0.0, expires - now):.0f} s); wait for it to finish or stop it"
    )


def is_stale(lease: dict, now: float | None = None, skew: float = CLOCK_SKEW_S) -> bool:
    """Whether a lease's owner missed its renewal: `now` (another machine's clock) is
    more than `skew` seconds past the lease's expiry. A released lease is stale too."""
    if lease.get("released"):
        return True
    now = SYSTEM_CLOCK.now() if now is None else now
    return now > float(lease.get("expires") or 0.0) + skew


def read_owner(out_uri: str) -> dict | None:
    """The current lease record of OUT, or None if nobody holds it (never taken, or
    released). A stale lease is returned: check it with `is_stale`."""
    uri = storage.normalize_uri(out_uri)
    _, _, record = latest(_backend(uri), uri)
    if record is None or record.get("released"):
        return None
    return record


def lease_seconds_setting() -> float:
    """How long a lease lasts unless renewed: DREG_LEASE_SECONDS, else 60 s. A shorter
    lease lets the next run take over a dead run's output sooner; every run on one
    output should use the same value."""
    text = os.environ.get(LEASE_VARIABLE, "").strip()
    if not text:
        return DEFAULT_LEASE_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 3:
        raise InputError(f"{LEASE_VARIABLE}={text!r}: must be a number of seconds, at least 3")
    return value


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
    it is taken over: `Lease.previous` is the stale record), or if it is held by the same
    run id (a retried flow: the earlier attempt loses its lease). Otherwise raises
    OwnedElsewhere naming the owner. Of concurrent callers exactly one wins.
    """
    if not isinstance(owner, str) or not owner.strip():
        raise InputError(f"invalid run id for the ownership of {out_uri}: {owner!r}")
    if lease_seconds is None:
        lease_seconds = lease_seconds_setting()
    if not lease_seconds > 0:
        raise InputError(f"lease_seconds must be positive, got {lease_seconds}")
    uri = storage.normalize_uri(out_uri)
    backend = _backend(uri)
    backend.check_atomic()
    token = uuid.uuid4().hex
    for _ in range(MAX_ROUNDS):
        generations, generation, record = latest(backend, uri)
        now = clock.now()
        if (
            record is not None
            and record.get("owner") != owner
            and not is_stale(record, now, skew_seconds)
        ):
            raise OwnedElsewhere(uri, record, now)
        previous = None if record is None or record.get("released") else record
        new = {
            "owner": owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
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
            return Lease(uri, new, lease_seconds, previous, clock)
    raise StorageError(f"{uri}: could not take ownership: the ownership record keeps changing")


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
    ):
        self.uri = uri
        self.owner: str = record["owner"]
        self.token: str = record["token"]
        self.lease_seconds = lease_seconds
        self.record = dict(record)
        self.previous = previous
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

    def check(self) -> None:
        """Raise LeaseLost if this run may no longer write to OUT: a renewal found the
        lease taken over, or the lease expired without being renewed."""
        if self._failure is not None:
            raise self._failure
        if self._released:
            raise LeaseLost(f"{self.uri}: run {self.owner} already released OUT")
        if self.clock.now() > self.expires:
            cause = f" ({storage.describe_storage_failure(self.uri, self.last_error)})"
            raise LeaseLost(
                f"{self.uri}: the ownership lease of run {self.owner} expired without "
                f"renewal{cause if self.last_error else ''}"
            )

    def _renew_loop(self, stop: threading.Event, interval: float) -> None:
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


def check_free(out_uri: str, *, clock: Clock = SYSTEM_CLOCK) -> None:
    """Refuse at once, naming the owner, when another run holds a live lease on OUT, or
    when the lease length setting is bad: the fast check a command makes before it starts
    a server or a cluster."""
    lease_seconds_setting()
    lease = read_owner(out_uri)
    now = clock.now()
    if lease is not None and not is_stale(lease, now):
        raise OwnedElsewhere(storage.normalize_uri(out_uri), lease, now)
