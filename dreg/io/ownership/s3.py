"""The lease's records on S3.

A record is created with ``PutObject`` and ``If-None-Match: *`` (HTTP 412 when the key
exists). Support is checked once per endpoint and bucket: a store that ignores the header
is refused rather than letting two runs both own OUT. No conditional delete or
``If-Match`` is needed.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import threading
import time
import uuid

from dreg.errors import StorageError
from dreg.io import storage
from dreg.io.ownership.records import GENERATION, LEASE_DIR, Backend, record_name

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


class S3Backend(Backend):
    def __init__(self, uri: str):
        self.uri = uri
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/{LEASE_DIR}/".lstrip("/")
        self.client = _s3_client()
        # The store's clock, from the Date header of its last answer: (its time, this
        # machine's monotonic time when it answered).
        self._server_time: tuple[float, float] | None = None

    def _note_time(self, response: dict) -> None:
        headers = (response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
        try:
            stamp = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return
        self._server_time = (stamp, time.monotonic())

    def now(self) -> float:
        """The store's clock: the Date of its last answer plus the time since (S3 dates
        LastModified with the same clock, to the second)."""
        if self._server_time is None:
            with contextlib.suppress(Exception):
                self._note_time(self.client.list_objects_v2(
                    Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1))
        if self._server_time is None:
            return time.time()
        stamp, at = self._server_time
        return stamp + (time.monotonic() - at)

    def _fail(self, exc: BaseException) -> StorageError:
        return StorageError(
            "cannot read or write the ownership record: "
            + storage.describe_storage_failure(self.uri, exc)
        )

    def _key(self, generation: int) -> str:
        return self.prefix + record_name(generation)

    def generations(self) -> list[int]:
        found: list[int] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    match = GENERATION.match(item["Key"][len(self.prefix) :])
                    if match:
                        found.append(int(match.group(1)))
        except Exception as exc:  # noqa: BLE001 - turned into a clear message
            raise self._fail(exc) from None
        return found

    def read(self, generation: int) -> tuple[bytes, float] | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(generation))
            self._note_time(response)
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
