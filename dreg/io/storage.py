"""Local paths and ``s3://`` URIs as fsspec filesystems and zarr stores.

S3 endpoint and credentials come from the standard AWS environment and config files
(AWS_PROFILE, AWS_ACCESS_KEY_ID, instance roles, ...). An S3-compatible endpoint is
taken from ``DREG_S3_ENDPOINT_URL``, then ``AWS_ENDPOINT_URL_S3``, then
``AWS_ENDPOINT_URL``. Credentials never appear in messages: errors name the URI only.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import fsspec
import zarr.storage

from dreg.errors import InputError, StorageError, describe, redact
from dreg.trust import check_s3_uri, is_s3  # noqa: F401 - part of this module's interface

T = TypeVar("T")
LOGGER = logging.getLogger(__name__)
ENDPOINT_VARIABLES = ("DREG_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# Attempts at two levels multiply: botocore retries each request (throttling, dropped
# connections), and s3fs retries what botocore gave up on. With a 3 s connect time-out a
# silent endpoint fails in about 2 x 3 x 3 s; a refused connection in about a second.
CONNECT_TIMEOUT_S = 3
BOTOCORE_ATTEMPTS = 3
S3FS_ATTEMPTS = 2


# "s3:" or "s3:/bucket/key": a URI short of a slash, which would be a local folder "s3:".
MISSPELT_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:(/[^/]|/?$)")


def normalize_uri(uri: str | os.PathLike) -> str:
    """An absolute local path, or an ``s3://`` URI without a trailing slash. InputError
    for an ``s3://`` URI without a bucket or with credentials in it."""
    text = str(uri)
    if is_s3(text):
        check_s3_uri(text)
        return text.rstrip("/")
    if "://" in text:
        raise StorageError(f"{redact(text)}: unsupported URI scheme (use a local path or s3://)",
                           transient=False)
    if MISSPELT_URI.match(text):
        raise InputError(f"{redact(text)}: not a local path nor a URI (a URI is SCHEME://..., "
                         "e.g. s3://BUCKET/KEY)")
    return str(Path(text).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri, *parts)
    return str(Path(uri, *parts))


def s3_endpoint_url() -> str | None:
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def storage_options(uri: str) -> dict:
    """fsspec options for a URI: for S3, the endpoint and short time-outs so that an
    unreachable endpoint fails in seconds rather than retrying for minutes."""
    if not is_s3(uri):
        return {}
    options: dict = {
        # Above 1, s3fs sends a HEAD before every whole-object GET to decide whether to
        # split it into ranged reads: a second request per zarr chunk. zarr already reads
        # many chunks at once.
        "max_concurrency": 1,
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": 60,
            "retries": {"max_attempts": BOTOCORE_ATTEMPTS, "mode": "standard"},
        },
    }
    endpoint = s3_endpoint_url()
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def _limit_s3fs_retries(fs: fsspec.AbstractFileSystem) -> None:
    # s3fs takes its retry count only as an attribute (the constructor passes unknown
    # options on to the botocore session); fsspec shares instances, so set it each time.
    if hasattr(fs, "retries"):
        fs.retries = S3FS_ATTEMPTS


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path within it."""
    uri = normalize_uri(uri)
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    if is_s3(uri):
        _limit_s3fs_retries(fs)
    return fs, path


def zarr_store(uri: str, read_only: bool = False) -> zarr.storage.StoreLike:
    """A zarr v3 store for a local path or an S3 URI (zarr v2 data opens through it too)."""
    uri = normalize_uri(uri)
    if is_s3(uri):
        store = zarr.storage.FsspecStore.from_url(
            uri, storage_options=storage_options(uri), read_only=read_only
        )
        _limit_s3fs_retries(store.fs)
        return store
    return zarr.storage.LocalStore(uri, read_only=read_only)


def describe_storage_failure(uri: str, exc: BaseException) -> str:
    """A one-line cause for a storage exception, without credentials or stack traces."""
    name = type(exc).__name__
    text = str(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return f"{uri}: no S3 credentials found (set AWS_PROFILE, AWS_ACCESS_KEY_ID/... or a role)"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or (
        "Could not connect" in text or "Connect timeout" in text
    ):
        endpoint = s3_endpoint_url() or "the default AWS endpoint"
        return f"{uri}: cannot reach the S3 endpoint {endpoint}"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"{uri}: access denied"
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"{uri}: the S3 credentials were rejected"
    if "NoSuchBucket" in text:
        return f"{uri}: the bucket does not exist"
    return f"{uri}: {describe(exc)}"


# Failures that trying again cannot mend: bytes that do not decode (or fail their
# checksum), a directory where a chunk should be, refused access.
PERMANENT_FAILURES = (ValueError, TypeError, RuntimeError, UnicodeError, IsADirectoryError,
                      NotADirectoryError, PermissionError)


# A full disk, a quota, a read-only file system: waiting would only delay the error.
PERMANENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def is_transient(exc: BaseException) -> bool:
    """Whether a storage failure may pass if tried again (an endpoint that does not
    answer, a dropped connection), as opposed to data that is broken or a disk that is
    full."""
    if isinstance(exc, StorageError):
        return exc.transient
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        return False
    return not isinstance(exc, PERMANENT_FAILURES)


def patiently(action: Callable[[], T], patience_seconds: float,
              first_wait: float = 1.0, longest_wait: float = 30.0) -> T:
    """Run `action`, trying again with growing waits while it fails with a transient
    storage error, for up to `patience_seconds` in all; then its error propagates."""
    deadline = time.monotonic() + patience_seconds
    wait = first_wait
    while True:
        try:
            return action()
        except StorageError as exc:
            remaining = deadline - time.monotonic()
            if not exc.transient or remaining <= 0:
                raise
            # Said, so that a wait of minutes is never silent.
            LOGGER.warning(f"{exc}; trying again in {min(wait, remaining):.0f} s "
                           f"(for up to {remaining:.0f} s more)")
            time.sleep(min(wait, remaining))
            wait = min(wait * 2, longest_wait)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - turned into a clear message
        raise StorageError(describe_storage_failure(uri, exc)) from None


def version_of(uri: str) -> str:
    """A file's size and modification stamp (ETag on S3): changes when it is rewritten."""
    fs, path = filesystem(uri)
    info = fs.info(path)
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}|{stamp}"


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open(path, "r") as handle:
        return handle.read()


def write_text(uri: str, text: str) -> None:
    """Write a small text file in one piece (a single PUT on S3)."""
    fs, path = filesystem(uri)
    if not is_s3(uri):
        fs.makedirs(posixpath.dirname(path) or path, exist_ok=True)
    with fs.open(path, "w") as handle:
        handle.write(text)


def replace_text(uri: str, text: str) -> None:
    """Replace a small text file so that a reader sees the old or the new text, never a
    part: a temporary file renamed over it on local disk; one PUT on S3 (atomic)."""
    if is_s3(uri):
        write_text(uri, text)
        return
    path = Path(normalize_uri(uri))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if not is_s3(uri):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _remove_empty_folders(folder: Path, top: Path) -> None:
    """Remove `folder` and its parents up to `top`, while they are empty (another
    process may have written into them meanwhile: then they stay)."""
    for each in (folder, *folder.parents):
        try:
            each.rmdir()
        except OSError:
            return
        if each == top:
            return


def check_writable(uri: str) -> None:
    """Fail early, naming the location, when nothing can be written under `uri`."""
    uri = normalize_uri(uri)
    probe = join(uri, ".dreg-write-probe")
    # The folders the probe creates are removed again: a check writes nothing, so that
    # bad input found after it still leaves no trace.
    created = None
    if not is_s3(uri):
        created = Path(uri)
        while not created.parent.exists() and created.parent != created:
            created = created.parent
        created = None if created.exists() else created
    try:
        write_text(probe, "ok")
        fs, path = filesystem(probe)
        fs.rm(path)
        if created is not None:
            _remove_empty_folders(Path(uri), created)
    except Exception as exc:  # noqa: BLE001 - turned into a clear message
        raise StorageError(
            f"output location not writable: {describe_storage_failure(uri, exc)}"
        ) from None
