"""Where a running `dreg view` says it is: one small record per viewer, so that the QC
page can link to a viewer of the same OUT while one runs.

The record lives in the user's runtime folder ($XDG_RUNTIME_DIR, else a folder of the
user's own under the temporary folder), never inside OUT: OUT may be read-only or on
object storage, `dreg qc` clears OUT/qc/, and a record copied along with OUT would name
a viewer on another machine. The folder is owner-only (the URL holds the viewer's random
token, which is what keeps other local users out of it). A record counts only while its
viewer answers at its URL: a viewer that died leaves a record that is ignored and
removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

from dreg.io import storage

FOLDER_NAME = "dreg-viewers"
ANSWER_TIMEOUT_S = 1.0


def records_folder(create: bool = True) -> Path:
    """The user's folder of viewer records, created owner-only (when `create`). Refuses
    (OSError) a folder that another user owns or that others may write to."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path(
        tempfile.gettempdir())
    folder = base / f"{FOLDER_NAME}-{os.getuid()}"
    if create:
        folder.mkdir(mode=0o700, exist_ok=True)
    status = folder.stat()
    if status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise OSError(f"{folder}: not a private folder of this user")
    return folder


def _key(out_uri: str) -> str:
    return hashlib.sha256(storage.normalize_uri(out_uri).encode()).hexdigest()[:16]


def write_record(out_uri: str, url: str) -> Path:
    """Record that this process serves a viewer of OUT at `url`; returns the record."""
    path = records_folder() / f"{_key(out_uri)}-{os.getpid()}.json"
    text = json.dumps({"out": storage.normalize_uri(out_uri), "url": url, "pid": os.getpid(),
                       "started": time.time()})
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    return path


def remove_record(path: Path) -> None:
    path.unlink(missing_ok=True)


def answers(url: str, timeout: float = ANSWER_TIMEOUT_S) -> bool:
    """Whether a web server answers `url` (a local viewer) with a page."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def running_viewer_url(out_uri: str) -> str | None:
    """The URL of a running viewer of OUT on this machine, or None. Records of viewers
    that no longer answer are removed."""
    try:
        folder = records_folder(create=False)
    except OSError:  # no viewer has run (no folder), or not a folder to trust
        return None
    out = storage.normalize_uri(out_uri)
    newest: tuple[float, str] | None = None
    for path in folder.glob(f"{_key(out)}-*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("out") != out or not isinstance(record.get("url"), str):
            continue
        if not answers(record["url"]):
            remove_record(path)
            continue
        if newest is None or record.get("started", 0) > newest[0]:
            newest = (record.get("started", 0), record["url"])
    return newest[1] if newest else None
