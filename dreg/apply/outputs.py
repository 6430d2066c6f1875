"""Outputs that a resumed run picks up and that never pass for finished while partial.

An output made by a chunk-wise flow (a warped image, an inverse field) records, in its
``dreg`` attributes, the identity of its inputs, a token naming this incarnation of the
output, and whether it is complete. A run for the same inputs reuses the output and its
finished chunks (the token is part of each chunk task's cache key); a run for other
inputs, or an output that was removed, starts a new incarnation with a new token, so no
cached chunk is mistaken for written. `complete` is set last.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable

from dreg.errors import InputError
from dreg.io import ome_zarr, storage


def identity_of(*parts: object) -> str:
    """A short, stable hash of what an output is computed from."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def prepare_output(uri: str, identity: str, create: Callable[[dict], object]) -> str:
    """Reuse the output at `uri` if it was made from `identity`, else make it anew with
    ``create(attributes)``; either way mark it incomplete. Returns the output's token."""
    attributes = output_attributes(uri)
    if attributes and attributes.get("inputs") == identity and attributes.get("token"):
        ome_zarr.update_attributes(uri, {"complete": False})
        return attributes["token"]
    token = uuid.uuid4().hex
    create({"inputs": identity, "token": token, "complete": False})
    return token


def mark_complete(uri: str, summary: dict) -> None:
    """The last write of a chunk-wise flow: the output is whole."""
    ome_zarr.update_attributes(uri, {"complete": True, "summary": summary})


def is_complete(uri: str) -> bool:
    attributes = output_attributes(uri)
    return bool(attributes and attributes.get("complete"))


def output_attributes(uri: str) -> dict | None:
    """The ``dreg`` attributes of the output at `uri`, or None when there is none."""
    if not storage.exists(uri):
        return None
    try:
        return ome_zarr.open_image(uri).attributes
    except InputError:
        return None


def prepare_parts(folder: str, identity: str) -> str:
    """A folder of parts (one file per batch) that a resumed run picks up: reused, with
    its token, when it was started for the same inputs; emptied and given a new token
    otherwise. The token keys the batches' cache, so a part is never assumed written
    after its folder was removed."""
    marker = storage.join(folder, "parts.json")
    if storage.exists(marker):
        recorded = json.loads(storage.read_text(marker))
        if recorded.get("inputs") == identity:
            return recorded["token"]
    storage.remove_tree(folder)
    token = uuid.uuid4().hex
    storage.write_text(marker, json.dumps({"inputs": identity, "token": token}))
    return token
