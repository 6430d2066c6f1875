"""One run at a time owns OUT: a lease with a heartbeat, on local disk and on S3.

A run takes a lease on its output location before writing anything and renews it while
it runs. A second run on the same OUT is refused with the owner's run id; a lease whose
owner died (no renewal past its expiry) is stale and is taken over.

Layout: ``OUT/.dreg-owner/<generation>.json``, one small immutable JSON record per
change of the lease (taken, renewed, released)::

    {"owner": <run id>, "host": ..., "pid": ..., "acquired": <unix time>,
     "renewed": <unix time>, "expires": <unix time>, "token": <uuid>,
     "generation": <n>, "released": <unix time or null>, "took_over_from": <run id or null>}

The record with the highest generation is the lease. Every change is a compare-and-swap
done with the one atomic primitive both backends share, *create if absent*: whoever read
generation n and wants to change the lease creates generation n + 1, and of any number of
takers, renewers and releasers that read n, exactly one creates n + 1; the others see it
on their next read. Generations only grow (the latest is never deleted, a release writes
a tombstone), so a record read long ago cannot be mistaken for the current one. Older
generations are pruned.

- Local disk: the record is written to a unique temporary file, then hard-linked to its
  generation name (``link`` fails if the name exists: atomic on POSIX file systems, NFS
  and Lustre included, and a reader never sees a half-written record). Where hard links
  are not supported, ``open(O_CREAT | O_EXCL)``.
- S3: ``PutObject`` with ``If-None-Match: *`` (HTTP 412 when the key exists). Support is
  checked once per endpoint and bucket: a store that ignores the header is refused rather
  than letting two runs both own OUT. No conditional delete or ``If-Match`` is needed.

Clocks: ``expires`` is written with the owner's clock; another run treats the lease as
stale only ``skew`` seconds after that (CLOCK_SKEW_S), and the owner treats it as lost as
soon as ``expires`` passes without a renewal.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from dreg.errors import DregError, InputError, StorageError
from dreg.io import storage

LEASE_DIR = ".dreg-owner"
CLOCK_SKEW_S = 5.0
DEFAULT_LEASE_S = 60.0
LEASE_VARIABLE = "DREG_LEASE_SECONDS"
# A record that cannot be parsed (only possible on file systems without hard links, while
# its writer is between create and write, or after outside damage) counts as held this long
# after it was last modified.
UNREADABLE_GRACE_S = 30.0
# Compare-and-swap rounds before giving up on a location that keeps changing under us.
MAX_ROUNDS = 20
KEEP_GENERATIONS = 2
TEMPORARY_MAX_AGE_S = 600.0

_GENERATION = re.compile(r"^(\d+)\.json$")


class OwnedElsewhere(InputError):
    """OUT is owned by another run whose lease is live."""

    def __init__(self, uri: str, lease: dict, now: float | None = None):
        self.uri = uri
        self.lease = lease
        self.now = time.time() if now is None else now
        super().__init__(describe_owner(uri, lease, self.now))

    def __reduce__(self):  # picklable (Prefect and Dask ship exceptions between processes)
        return (type(self), (self.uri, self.lease, self.now))


class LeaseLost(DregError):
    """This run no longer owns OUT (taken over, released, or not renewed in time)."""


def _generation_name(generation: int) -> str:
    return f"{generation:012d}.json"


def describe_owner(uri: str, lease: dict, now: float | None = None) -> str:
    """'<OUT>: in use by run <id> (host h, pid p; lease renewed n s ago, expires in m s);
    wait for it to finish or stop it'."""
    now = time.time() if now is None else now
    if lease.get("unreadable"):
        return (
            f"{uri}: in use (its ownership record {LEASE_DIR}/"
            f"{_generation_name(lease['generation'])} is being written or is damaged); "
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
    now = time.time() if now is None else now
    return now > float(lease.get("expires") or 0.0) + skew


def read_owner(out_uri: str) -> dict | None:
    """The current lease record of OUT, or None if nobody holds it (never taken, or
    released). A stale lease is returned: check it with `is_stale`."""
    uri = storage.normalize_uri(out_uri)
    _, _, record = _latest(_backend(uri), uri)
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
) -> Lease:
    """Take ownership of OUT for run `owner`, for `lease_seconds` (default:
    `lease_seconds_setting()`) unless renewed.

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
        generations, generation, record = _latest(backend, uri)
        now = time.time()
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
        if _create(backend, uri, generation + 1, new):
            _prune(backend, generations, generation + 1)
            return Lease(uri, new, lease_seconds, previous)
    raise StorageError(f"{uri}: could not take ownership: the ownership record keeps changing")


class Lease:
    """Ownership of OUT by one run: renew it (or use keep_alive), check it before
    committing results, release it when done. It stays in the process that took it
    (the flow), and is not pickled."""

    def __init__(self, uri: str, record: dict, lease_seconds: float, previous: dict | None):
        self.uri = uri
        self.owner: str = record["owner"]
        self.token: str = record["token"]
        self.lease_seconds = lease_seconds
        self.record = dict(record)
        self.previous = previous
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
            generations, generation, record = _latest(backend, self.uri)
            if not self._is_mine(generation, record):
                raise self._lost(record, "renewal refused")
            now = time.time()
            new = dict(self.record, renewed=now, expires=now + self.lease_seconds)
            new["generation"] = generation + 1
            if not _create(backend, self.uri, generation + 1, new):
                _, _, record = _latest(backend, self.uri)
                raise self._lost(record, "renewal refused")
            self.record = new
            _prune(backend, generations, generation + 1)

    def release(self) -> None:
        """Give up ownership, if this run still holds it; otherwise do nothing."""
        with self._lock:
            if self._released:
                return
            self._released = True
            backend = _backend(self.uri)
            generations, generation, record = _latest(backend, self.uri)
            if not self._is_mine(generation, record):
                return
            now = time.time()
            tombstone = dict(self.record, released=now, expires=now)
            tombstone["generation"] = generation + 1
            if _create(backend, self.uri, generation + 1, tombstone):
                self.record = tombstone
                _prune(backend, generations, generation + 1)

    def check(self) -> None:
        """Raise LeaseLost if this run may no longer write to OUT: a renewal found the
        lease taken over, or the lease expired without being renewed."""
        if self._failure is not None:
            raise self._failure
        if self._released:
            raise LeaseLost(f"{self.uri}: run {self.owner} already released OUT")
        if time.time() > self.expires:
            cause = f" ({storage.describe_storage_failure(self.uri, self.last_error)})"
            raise LeaseLost(
                f"{self.uri}: the ownership lease of run {self.owner} expired without "
                f"renewal{cause if self.last_error else ''}"
            )

    def _renew_loop(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            try:
                self.renew()
                self.last_error = None
            except LeaseLost as exc:
                if not self._released:  # released in the block: not a failure
                    self._failure = exc
                return
            except Exception as exc:  # noqa: BLE001 - a transient failure: retried
                self.last_error = exc
                if time.time() > self.expires:
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


# --- the compare-and-swap over generations ---------------------------------------------


def _parse(generation: int, data: bytes, modified: float) -> dict:
    try:
        record = json.loads(data)
        if not isinstance(record, dict) or not record.get("token"):
            raise ValueError("not a lease record")
    except ValueError:
        return {
            "owner": None,
            "unreadable": True,
            "generation": generation,
            "renewed": modified,
            "expires": modified + UNREADABLE_GRACE_S,
        }
    record["generation"] = generation
    return record


def _latest(backend: _Backend, uri: str) -> tuple[list[int], int, dict | None]:
    """(all generations, the highest, its record); (…, 0, None) if there is none."""
    for _ in range(MAX_ROUNDS):
        generations = backend.generations()
        if not generations:
            return generations, 0, None
        generation = max(generations)
        found = backend.read(generation)
        if found is None:  # pruned after a newer one appeared: look again
            continue
        return generations, generation, _parse(generation, *found)
    raise StorageError(f"{uri}: the ownership record keeps changing while being read")


def _create(backend: _Backend, uri: str, generation: int, record: dict) -> bool:
    """Create a generation unless it exists. True if ours is there (also when a retried
    request finds the record its own lost first attempt created)."""
    data = json.dumps(record, indent=1).encode()
    if backend.create(generation, data):
        return True
    found = backend.read(generation)
    return found is not None and found[0] == data


def _prune(backend: _Backend, generations: list[int], current: int) -> None:
    """Delete generations older than the last KEEP_GENERATIONS (best effort)."""
    for generation in generations:
        if generation <= current - KEEP_GENERATIONS:
            with contextlib.suppress(Exception):
                backend.delete(generation)
    with contextlib.suppress(Exception):
        backend.clean_temporary()


# --- backends ---------------------------------------------------------------------------


class _Backend:
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

    def check_atomic(self) -> None:
        """Raise StorageError if `create` cannot be atomic here."""

    def clean_temporary(self) -> None:
        """Remove leftovers of writers that died."""


def _backend(uri: str) -> _Backend:
    return _S3Backend(uri) if storage.is_s3(uri) else _LocalBackend(uri)


class _LocalBackend(_Backend):
    def __init__(self, uri: str):
        self.uri = uri
        self.directory = Path(uri) / LEASE_DIR

    def _fail(self, exc: OSError) -> StorageError:
        return StorageError(
            f"{self.uri}: cannot read or write its ownership record: "
            f"{exc.strerror or type(exc).__name__}"
        )

    def generations(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._fail(exc) from None
        return [int(m.group(1)) for m in map(_GENERATION.match, names) if m]

    def read(self, generation: int) -> tuple[bytes, float] | None:
        try:
            with open(self.directory / _generation_name(generation), "rb") as handle:
                return handle.read(), os.fstat(handle.fileno()).st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._fail(exc) from None

    def create(self, generation: int, data: bytes) -> bool:
        target = self.directory / _generation_name(generation)
        temporary = self.directory / f"tmp-{uuid.uuid4().hex}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_new(temporary, data)
            try:
                os.link(temporary, target)
                return True
            except FileExistsError:
                # On NFS a retransmitted LINK whose reply was lost reports EEXIST although
                # it succeeded: then the temporary file has two names.
                return os.stat(temporary).st_nlink >= 2
            except OSError:  # no hard links here (some FUSE, SMB, FAT): exclusive create
                try:
                    _write_new(target, data)
                    return True
                except FileExistsError:
                    return False
        except OSError as exc:
            raise self._fail(exc) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    def delete(self, generation: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / _generation_name(generation))

    def clean_temporary(self) -> None:
        now = time.time()
        for entry in os.scandir(self.directory):
            if entry.name.startswith("tmp-"):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > TEMPORARY_MAX_AGE_S:
                        os.unlink(entry.path)


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` (FileExistsError if it exists), write `data` and flush it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()
_atomic_checked: set[tuple] = set()


def _s3_client():
    """A boto3 S3 client on the project's endpoint and the standard AWS credentials,
    shared by threads (boto3 clients are thread-safe; making one is not)."""
    endpoint = storage.s3_endpoint_url()
    key = (
        endpoint,
        os.environ.get("AWS_PROFILE"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
    )
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=storage.CONNECT_TIMEOUT_S,
                read_timeout=60,
                retries={"max_attempts": storage.BOTOCORE_ATTEMPTS, "mode": "standard"},
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            _clients[key] = client
        return client


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _is_conflict(exc: BaseException) -> bool:
    """412: the key exists; 409: another conditional write to it is in flight (AWS asks
    to retry: the caller reads the winner and decides again)."""
    return _error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict") or (
        _status(exc) in (409, 412)
    )


def _is_missing(exc: BaseException) -> bool:
    return _error_code(exc) in ("NoSuchKey", "404") or _status(exc) == 404


class _S3Backend(_Backend):
    def __init__(self, uri: str):
        self.uri = uri
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/{LEASE_DIR}/".lstrip("/")
        self.client = _s3_client()

    def _fail(self, exc: BaseException) -> StorageError:
        return StorageError(
            "cannot read or write the ownership record: "
            + storage.describe_storage_failure(self.uri, exc)
        )

    def _key(self, generation: int) -> str:
        return self.prefix + _generation_name(generation)

    def generations(self) -> list[int]:
        found: list[int] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    match = _GENERATION.match(item["Key"][len(self.prefix) :])
                    if match:
                        found.append(int(match.group(1)))
        except Exception as exc:  # noqa: BLE001 - turned into a clear message
            raise self._fail(exc) from None
        return found

    def read(self, generation: int) -> tuple[bytes, float] | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(generation))
            return response["Body"].read(), response["LastModified"].timestamp()
        except Exception as exc:  # noqa: BLE001 - turned into a clear message
            if _is_missing(exc):
                return None
            raise self._fail(exc) from None

    def create(self, generation: int, data: bytes) -> bool:
        return self._put_new(self._key(generation), data)

    def _put_new(self, key: str, data: bytes) -> bool:
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                IfNoneMatch="*",
                ContentType="application/json",
            )
            return True
        except Exception as exc:  # noqa: BLE001 - turned into a clear message
            if _is_conflict(exc):
                return False
            raise self._fail(exc) from None

    def delete(self, generation: int) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(generation))

    def check_atomic(self) -> None:
        """Refuse a store that ignores If-None-Match (it would let two runs own OUT):
        create a unique probe object, create it again (must be refused), delete it."""
        key = (storage.s3_endpoint_url(), self.bucket)
        with _clients_lock:
            if key in _atomic_checked:
                return
        probe = f"{self.prefix}probe-{uuid.uuid4().hex}"
        try:
            first = self._put_new(probe, b"probe")
            second = self._put_new(probe, b"probe")
        finally:
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=probe)
        if not first or second:
            endpoint = storage.s3_endpoint_url() or "the default AWS endpoint"
            raise StorageError(
                f"{self.uri}: the S3 endpoint {endpoint} does not honour conditional writes "
                "(PutObject with If-None-Match), so two runs could both write to this "
                "output; use a store that supports them (AWS S3, recent MinIO or Ceph)"
            )
        with _clients_lock:
            _atomic_checked.add(key)


def check_free(out_uri: str) -> None:
    """Refuse at once, naming the owner, when another run holds a live lease on OUT, or
    when the lease length setting is bad: the fast check a command makes before it starts
    a server or a cluster."""
    lease_seconds_setting()
    lease = read_owner(out_uri)
    if lease is not None and not is_stale(lease):
        raise OwnedElsewhere(storage.normalize_uri(out_uri), lease)
