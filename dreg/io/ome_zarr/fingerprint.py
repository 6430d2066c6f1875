"""The version of an image's content: a hash of its metadata and of the listing of its
chunk objects (name, size, modification time or ETag), cheap next to reading voxels."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from dreg.errors import StorageError
from dreg.io import storage
from dreg.io.ome_zarr.metadata import OmeZarrImage


def fingerprint(image: OmeZarrImage, levels: Sequence[int] | None = None) -> str:
    """A version identifier of an image's content, cheap to compute for large images.

    Hashes the metadata and the listing (name, size, modification time or ETag) of every
    chunk object of the chosen levels: rewriting any chunk under the same URI changes it.
    """
    fs, root = storage.filesystem(image.uri)
    digest = hashlib.sha256(json.dumps(image.describe(), sort_keys=True).encode())
    chosen = range(len(image.levels)) if levels is None else levels
    for level in chosen:
        path = f"{root}/{image.level(level).path}"
        try:
            listing = fs.find(path, detail=True, withdirs=True)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(storage.describe_storage_failure(image.uri, exc)) from None
        _refuse_directory_chunks(image, level, path, listing)
        for name in sorted(listing):
            info = listing[name]
            if info.get("type") == "directory":
                continue
            stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
            digest.update(f"{name[len(root):]}|{info.get('size')}|{stamp}\n".encode())
    return digest.hexdigest()[:32]


def _refuse_directory_chunks(image: OmeZarrImage, level: int, path: str,
                             listing: dict) -> None:
    """A directory where a chunk belongs reads as an absent chunk (zarr's fill value):
    name it as the damage it is."""
    depth = 4 if image.components is not None else 3
    for name, info in listing.items():
        parts = name[len(path):].strip("/").split("/")
        if info.get("type") == "directory" and parts[0] == "c" and len(parts) == depth + 1:
            where = tuple(int(p) for p in parts[-3:]) if all(
                p.isdigit() for p in parts[1:]) else parts[1:]
            raise StorageError(
                f"{image.uri}: level {level} (array '{image.level(level).path}'), chunk "
                f"{where} (z, y, x) cannot be read: it is a directory, not a chunk",
                transient=False)


