"""The version of an image's content: a hash of its metadata and of the listing of its
chunk objects (name, size, modification time or ETag), cheap next to reading voxels."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from dreg.errors import StorageError
from dreg.io import storage
from dreg.io.ome_zarr.metadata import OmeZarrImage


@dataclass(frozen=True)
class ImageVersion:
    """An image's content versions from one listing of its chunks: `whole` equals
    ``fingerprint(image)`` and ``levels[k]`` equals ``fingerprint(image, [k])``."""

    whole: str
    levels: tuple[str, ...]


def fingerprint(image: OmeZarrImage, levels: Sequence[int] | None = None) -> str:
    """A version identifier of an image's content, cheap to compute for large images.

    Hashes the metadata and the listing (name, size, modification time or ETag) of every
    chunk object of the chosen levels: rewriting any chunk under the same URI changes it.
    """
    digest = _metadata_digest(image)
    chosen = range(len(image.levels)) if levels is None else levels
    for level in chosen:
        for line in _chunk_lines(image, level):
            digest.update(line)
    return digest.hexdigest()[:32]


def image_version(image: OmeZarrImage) -> ImageVersion:
    """The whole image's fingerprint and each level's, listing every level once (on a
    large image in object storage, a listing is the cost of a fingerprint)."""
    metadata = _metadata_digest(image)
    whole = metadata.copy()
    levels = []
    for level in range(len(image.levels)):
        one = metadata.copy()
        for line in _chunk_lines(image, level):
            whole.update(line)
            one.update(line)
        levels.append(one.hexdigest()[:32])
    return ImageVersion(whole=whole.hexdigest()[:32], levels=tuple(levels))


def _metadata_digest(image: OmeZarrImage):
    return hashlib.sha256(json.dumps(image.describe(), sort_keys=True).encode())


def _chunk_lines(image: OmeZarrImage, level: int) -> list[bytes]:
    """One line per chunk object of a level (its name below the image, size and stamp),
    sorted by name."""
    fs, root = storage.filesystem(image.uri)
    path = f"{root}/{image.level(level).path}"
    listing = _listing(image, fs, path)
    _refuse_directory_chunks(image, level, path, listing)
    lines = []
    for name in sorted(listing):
        info = listing[name]
        if info.get("type") == "directory":
            continue
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        lines.append(f"{name[len(root):]}|{info.get('size')}|{stamp}\n".encode())
    return lines


def _listing(image: OmeZarrImage, fs, path: str) -> dict:
    """Every object below a level's array (one listing request, or one per page)."""
    try:
        return fs.find(path, detail=True, withdirs=True)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(storage.describe_storage_failure(image.uri, exc)) from None


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


