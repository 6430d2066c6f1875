"""When an output is complete: one convention for every output dreg writes.

An output is complete when it carries a *completion mark*, written last, after all of
its content: the identity of what the output was computed from. A reader asks whether
an output is complete *for the identity it expects*; an output without the mark, or
marked for other inputs, is never read as a result. Starting an output over clears the
mark first, so that a partial output never passes for a finished one.

Where the mark lives depends on the kind of output:

- **OME-Zarr outputs** (each stage's field, the final field, the warped image, the
  inverse): the root ``dreg`` attributes hold ``inputs`` (the identity) and
  ``complete`` (true once whole). A chunk-wise output that a resumed run picks up also
  holds a ``token`` naming this incarnation of the output (`start`), and a *chunk mark*
  per chunk written (`once`): a small JSON file, ``.dreg-chunks/<token>/<name>.json``
  inside the output, holding what the chunk's task returned, written after the chunk.
  A resumed run skips the chunks marked for the output's token; a new incarnation
  (other inputs, or the output was removed) gets a new token and trusts no old mark.
- **File outputs written in one piece** (a registration's result.json, a points table):
  the file itself is the mark (`write_whole`, `file_is_complete`): it is written whole
  and last, so its presence means the output is complete; what it was computed from is
  in its content (result.json) or in the run that wrote it. While such a file is built
  from parts (the points' batches), its parts folder holds the same record as a Zarr
  output in progress, ``parts.json`` with ``inputs`` and ``token`` (`start_parts`).

Fields written before this convention carry ``identity`` alone; they read as complete
for that identity.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable

from dreg.errors import InputError
from dreg.io import ome_zarr, storage

INPUTS = "inputs"
COMPLETE = "complete"
TOKEN = "token"
PARTS_RECORD = "parts.json"
CHUNK_MARKS = ".dreg-chunks"
_TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")
# The mark of fields written before this convention: the identity, written last.
_OLD_FIELD_MARK = "identity"


def identity_of(*parts: object) -> str:
    """A short, stable hash of what an output is computed from."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- OME-Zarr outputs


def record(uri: str) -> dict | None:
    """The ``dreg`` root attributes of the OME-Zarr output at `uri`, or None when there is
    no readable output there."""
    if not storage.exists(uri):
        return None
    try:
        return ome_zarr.open_image(uri).attributes
    except InputError:
        return None


def completed_identity(attributes: dict | None) -> str | None:
    """The identity an output with these ``dreg`` attributes was completed for, or None
    when it is not complete."""
    if not attributes:
        return None
    if attributes.get(COMPLETE) is True:
        return attributes.get(INPUTS)
    if COMPLETE not in attributes:
        return attributes.get(_OLD_FIELD_MARK)
    return None


def is_complete(uri: str, identity: str | None = None) -> bool:
    """Whether the OME-Zarr output at `uri` is complete, for `identity` when given (for
    any inputs when None)."""
    found = completed_identity(record(uri))
    return found is not None and (identity is None or found == identity)


def mark_complete(uri: str, identity: str, details: dict | None = None) -> None:
    """The last write of an OME-Zarr output, once every chunk is written: the output is
    whole and was computed from `identity`. `details` (a summary) go in with the mark."""
    ome_zarr.update_attributes(uri, {**(details or {}), INPUTS: identity, COMPLETE: True})


def clear(uri: str) -> None:
    """Mark the OME-Zarr output at `uri` incomplete: it is being written again."""
    # `complete` present and false also voids an old field's mark.
    ome_zarr.update_attributes(uri, {COMPLETE: False})


def start(uri: str, identity: str, create: Callable[[dict], object]) -> str:
    """Begin (or resume) writing a chunk-wise OME-Zarr output; returns its token.

    An output at `uri` made from `identity` is reused with its token and marked
    incomplete; otherwise ``create(attributes)`` makes it anew, with a new token and
    the given attributes (inputs, token, not complete) in its ``dreg`` attributes."""
    attributes = record(uri)
    if attributes and attributes.get(INPUTS) == identity and _is_token(attributes.get(TOKEN)):
        clear(uri)
        return attributes[TOKEN]
    token = uuid.uuid4().hex
    create({INPUTS: identity, TOKEN: token, COMPLETE: False})
    return token


# ----------------------------------------------------------------------------- file outputs


def write_whole(uri: str, text: str, replace: bool = False) -> None:
    """Write a file output in one piece, as its last write: its presence is its mark.
    `replace` rewrites an existing one so that it never reads as anything but whole."""
    if replace:
        storage.replace_text(uri, text)
    else:
        storage.write_text(uri, text)


def file_is_complete(uri: str) -> bool:
    """Whether the file output at `uri` was written (whole, since it is written last)."""
    return storage.exists(uri)


def start_parts(folder: str, identity: str) -> str:
    """Begin (or resume) a file output built from parts (one file per batch) in
    `folder`; returns its token. The folder is reused, with its token, when it was started
    for the same inputs; emptied and given a new token otherwise. The token keys the
    batches' cache, so a part is never assumed written after its folder was removed."""
    marker = storage.join(folder, PARTS_RECORD)
    if storage.exists(marker):
        recorded = _json_object(storage.read_bytes(marker)) or {}
        if recorded.get(INPUTS) == identity and _is_token(recorded.get(TOKEN)):
            return recorded[TOKEN]
    elif storage.exists(folder):
        # Not a parts folder dreg started: never removed.
        raise InputError(f"{folder}: exists and is not a parts folder written by dreg; "
                         "move it away or choose another output")
    storage.remove_tree(folder)
    token = uuid.uuid4().hex
    storage.write_text(marker, json.dumps({INPUTS: identity, TOKEN: token}))
    return token


# ----------------------------------------------------------------------------- chunk marks


def chunk_mark(folder: str, token: str, name: str) -> str:
    """Where the mark of chunk `name` of the output in `folder` (incarnation `token`) is."""
    if not _is_token(token):
        raise ValueError(f"not an output token: {token!r}")
    return storage.join(folder, CHUNK_MARKS, token, f"{name}.json")


def chunk_result(folder: str, token: str, name: str) -> dict | None:
    """What chunk `name` returned when it was written for this incarnation of the output,
    or None when it is not marked written (or its mark is not a JSON object)."""
    try:
        data = storage.read_bytes(chunk_mark(folder, token, name))
    except FileNotFoundError:
        return None
    return _json_object(data)


def mark_chunk(folder: str, token: str, name: str, result: dict) -> None:
    """Mark chunk `name` written, after its data, with what its task returned (JSON)."""
    storage.write_text(chunk_mark(folder, token, name), json.dumps(result, default=_plain))


def once(folder: str, token: str, name: str, compute: Callable[[], dict]) -> dict:
    """Compute and write one chunk of an output unless it is marked written for this
    incarnation; returns the chunk's result either way, so that a re-run or a resumed
    run never redoes a finished chunk."""
    done = chunk_result(folder, token, name)
    if done is not None:
        return done
    result = compute()
    mark_chunk(folder, token, name, result)
    return result


def _plain(value: object) -> object:
    """NumPy scalars in a chunk's result, as JSON numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def _is_token(value: object) -> bool:
    return isinstance(value, str) and _TOKEN_PATTERN.fullmatch(value) is not None


def _json_object(data: bytes) -> dict | None:
    try:
        found = json.loads(data)
    except ValueError:  # not JSON, or not text at all
        return None
    return found if isinstance(found, dict) else None
