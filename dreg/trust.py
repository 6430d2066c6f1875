"""Validation of untrusted parameters (those that arrive with an event).

An event can name any string as an image. Before it is used: the scheme must be one we
serve (``s3://`` or a local path), it must lie under one of the prefixes the deployment
allows (an S3 bucket/prefix, or a local root: resolved, so ``..`` cannot climb out), it
must carry no credentials and be of sane length, and the version must be a plain label.
The numbers a deployment sets in its environment (workers, lease length, voxel limit)
are checked here too, so a typo fails before any work is spent.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from dreg.errors import InputError, redact

MAX_URI_LENGTH = 1024
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9._:+-]{0,128}$")
S3_URI_PATTERN = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x1f\x7f]*)?$")
Number = TypeVar("Number", int, float)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def check_s3_uri(uri: str) -> None:
    """Refuse an ``s3://`` URI without a bucket (``s3://``, ``s3:///key``), or one that
    carries credentials (``s3://KEY:SECRET@bucket``: they belong in the environment, and
    would be echoed into messages, logs and event resources)."""
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    if "@" in bucket:
        raise InputError(f"{redact(uri)}: credentials in an s3:// URI are not accepted; "
                         "give them as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if not bucket:
        raise InputError(f"{uri}: an s3:// URI needs a bucket (s3://BUCKET/KEY)")


def _local_under(path: str, root: str) -> bool:
    resolved, base = Path(path).resolve(), Path(root).resolve()
    return resolved == base or base in resolved.parents


def _s3_under(uri: str, prefix: str) -> bool:
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    return uri.rstrip("/") + "/" == prefix or uri.startswith(prefix)


def check_form(uri: str, name: str = "uri") -> str:
    """The checks of an untrusted URI that need no allowed prefixes: present, of sane
    length, ``s3://BUCKET/...`` (no credentials, no ``..``) or an absolute local path.
    Returns it stripped; raises InputError naming `name` and the problem."""
    if not isinstance(uri, str) or not uri.strip():
        raise InputError(f"{name}: missing (an s3:// URI or a local path is required)")
    uri = uri.strip()
    if len(uri) > MAX_URI_LENGTH:
        raise InputError(f"{name}: longer than {MAX_URI_LENGTH} characters")
    if uri.startswith("s3://"):
        if "@" in uri.split("/", 3)[2] or not S3_URI_PATTERN.match(uri):
            raise InputError(f"{name}: not a valid s3:// URI")
        if ".." in uri.split("/"):
            raise InputError(f"{name}: '..' is not allowed in an s3:// URI")
        return uri
    if "://" in uri or uri.startswith("file:"):
        scheme = uri.split(":", 1)[0]
        raise InputError(f"{name}: scheme '{scheme}' is not allowed (use s3:// or a local path)")
    if not os.path.isabs(uri):
        raise InputError(f"{name}: a local path must be absolute")
    return uri


def validate_uri(uri: str, allowed_prefixes: Sequence[str], name: str = "uri") -> str:
    """Return the normalised URI, or raise InputError naming `name` and the problem."""
    uri = check_form(uri, name)
    if not allowed_prefixes:
        raise InputError(f"{name}: no allowed prefixes are configured for this deployment")
    if uri.startswith("s3://"):
        allowed = [p for p in allowed_prefixes if p.startswith("s3://")]
        if not any(_s3_under(uri, p) for p in allowed):
            raise InputError(f"{name}: {uri} is outside the allowed prefixes "
                             f"({', '.join(allowed_prefixes)})")
        return uri.rstrip("/")
    roots = [p for p in allowed_prefixes if not p.startswith("s3://")]
    if not any(_local_under(uri, root) for root in roots):
        raise InputError(f"{name}: {uri} is outside the allowed prefixes "
                         f"({', '.join(allowed_prefixes)})")
    return str(Path(uri).resolve())


MAX_LINKS_CHECKED = 10_000_000  # entries of a local image walked for links


def check_links(uri: str, allowed_prefixes: Sequence[str], name: str = "uri") -> None:
    """Refuse a local image (a folder of chunks) holding a symbolic link whose target
    lies outside the allowed local prefixes: a chunk linked to any file on the worker
    would be read as voxels, and so leak it. `uri` is a validated local path (S3 has no
    links); the link's target is resolved fully (links of links, ..)."""
    if uri.startswith("s3://") or not os.path.isdir(uri):
        return
    roots = [p for p in allowed_prefixes if not p.startswith("s3://")]
    seen = 0
    for folder, folders, files in os.walk(uri, followlinks=False):
        for entry in (*folders, *files):
            seen += 1
            if seen > MAX_LINKS_CHECKED:
                raise InputError(f"{name}: more than {MAX_LINKS_CHECKED} files in {uri}")
            path = os.path.join(folder, entry)
            if os.path.islink(path) and not any(_local_under(path, root) for root in roots):
                raise InputError(f"{name}: {path} is a link to a place outside the allowed "
                                 f"prefixes ({', '.join(allowed_prefixes)})")


def validate_version(version: str | None) -> str:
    """A version label: letters, digits and ._:+- only, up to 128 characters."""
    version = (version or "").strip()
    if not VERSION_PATTERN.match(version):
        raise InputError("version: only letters, digits and ._:+- are allowed "
                         "(up to 128 characters)")
    return version


def check_size(shape_zyx: Sequence[int], max_voxels: int, name: str) -> None:
    voxels = 1
    for n in shape_zyx:
        voxels *= int(n)
    if voxels > max_voxels:
        raise InputError(f"{name}: {voxels} voxels is more than this deployment accepts "
                         f"({max_voxels})")


def readable_name(moving_uri: str, version: str) -> str:
    """The moving image's name and its version, as plain characters."""
    stem = moving_uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".ome.zarr", ".zarr"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "volume"
    return f"{stem}-{version}" if version else stem


def output_name(moving_uri: str, version: str) -> str:
    """A folder name for a registration's output, readable and unique: the moving
    image's name, its version, and a short hash of its whole URI (two volumes of one
    name in different folders must not share an output)."""
    digest = hashlib.sha256(moving_uri.rstrip("/").encode()).hexdigest()[:8]
    return f"{readable_name(moving_uri, version)}-{digest}"


def bounded_setting(
    variable: str,
    parse: Callable[[str], Number],
    low: float,
    high: float,
    requirement: str,
    default: Number | None = None,
    environ: Mapping[str, str] | None = None,
) -> Number | None:
    """The number `parse` reads from the environment variable, from `low` to `high`;
    `default` when the variable is unset or blank. Anything else (not a number, NaN,
    out of range) is an InputError naming the variable, its text and `requirement`
    ("must be …"), before any work is spent."""
    environ = os.environ if environ is None else environ
    text = environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = parse(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise InputError(f"{variable}={text[:40]!r}: must be {requirement}")
    return value
