"""Writing OME-Zarr images: create an empty multiscale image (OME-Zarr 0.5, or a 0.6rc0
displacement field) and fill it region by region, nothing held whole in memory."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import product

import numpy as np
import zarr
from pydantic import ValidationError
from zarr.codecs import Crc32cCodec, ZstdCodec

from dreg.errors import InputError, StorageError
from dreg.grid import Grid, Region
from dreg.io import storage
from dreg.io.ome_zarr.metadata import (
    DEFAULT_CHUNK,
    SPATIAL_AXES,
    ImageLevel,
    OmeZarrImage,
    _displacement_attrs,
    _ngff_attrs,
)
from dreg.io.ome_zarr.read import _open_array

# The kinds of output dreg writes as OME-Zarr, by what their root metadata says.
IMAGE = "image"
FIELD_KINDS = {"fixed_to_moving": "a displacement field", "moving_to_fixed": "an inverse field"}


def written_kind(uri: str) -> str | None:
    """What dreg output the OME-Zarr at `uri` is, read from its root metadata only:
    `IMAGE` for an image dreg wrote, "displacement_field/<mapping>" for a field, and None
    for anything else (not OME-Zarr, or not written by dreg)."""
    try:
        metadata = json.loads(storage.read_bytes(storage.join(uri, "zarr.json")))
    except (OSError, ValueError):
        return None
    attributes = metadata.get("attributes") if isinstance(metadata, dict) else None
    if not isinstance(attributes, dict):
        return None
    ome, dreg = attributes.get("ome"), attributes.get("dreg")
    if not (isinstance(ome, dict) and "multiscales" in ome and isinstance(dreg, dict)):
        return None
    if dreg.get("kind") == "displacement_field":
        return f"displacement_field/{dreg.get('mapping')}"
    return IMAGE


def _kind_name(kind: str) -> str:
    if kind == IMAGE:
        return "an OME-Zarr image written by dreg"
    return f"{FIELD_KINDS.get(kind.rsplit('/', 1)[-1], 'a field')} written by dreg"


def occupied(uri: str) -> bool:
    """Whether anything is at `uri`: a file, or a folder (or S3 prefix) that holds
    something. An empty folder is not occupied."""
    fs, path = storage.filesystem(uri)
    try:
        if not fs.exists(path):
            return False
        return not fs.isdir(path) or bool(fs.ls(path, detail=False))
    except Exception as exc:  # noqa: BLE001 - turned into a clear message
        raise StorageError(storage.describe_storage_failure(uri, exc)) from None


def check_can_create(uri: str, kind: str, overwrite: bool) -> None:
    """Refuse, with one line naming `uri`, to write an output of `kind` where something
    is already: it is replaced only with `overwrite`, and only when its metadata says it
    is an output of the same kind that dreg wrote. Nothing is touched here."""
    if not occupied(uri):
        return
    if written_kind(uri) != kind:
        raise InputError(f"{uri}: exists and is not {_kind_name(kind)}; not replaced "
                         "(move it away or choose another destination)")
    if not overwrite:
        raise InputError(f"{uri}: already exists (pass --overwrite to replace it)")


def create_image(
    uri: str,
    grids: Sequence[Grid],
    dtype: str | np.dtype,
    chunks: int | Sequence[int] = DEFAULT_CHUNK,
    components: int | None = None,
    dreg_attributes: dict | None = None,
    name: str = "image",
    overwrite: bool = False,
    fill_value: float = 0,
    compressed: bool = True,
    unit: str | None = None,
    displacement: bool = False,
) -> OmeZarrImage:
    """Create an empty OME-Zarr 0.5 multiscale image (metadata and empty arrays), or with
    `displacement` a 0.6rc0 displacement field (see `metadata`).

    `grids` are the levels, finest first. Voxels are written later, region by region,
    with `write_region`. The direction of the first grid is stored in ``dreg.direction``.
    Every chunk is stored with a crc32c checksum of its bytes (after zstd, when
    `compressed`), so that a chunk changed on disk is an error when read, never garbage.
    Levels that do not make valid OME-Zarr 0.5 (as ome-zarr-models validates it) raise
    InputError before anything is written. Nothing already at `uri` is replaced, except
    with `overwrite` an output of the same kind that dreg wrote (`check_can_create`).
    """
    uri = storage.normalize_uri(uri)
    chunk_zyx = (chunks,) * 3 if isinstance(chunks, int) else tuple(chunks)
    try:  # validated before anything is written
        attrs = (_displacement_attrs(grids, name, unit) if displacement
                 else _ngff_attrs(grids, components, name, unit))
    except ValidationError as exc:
        raise InputError(f"{uri}: the levels do not make a valid OME-Zarr image "
                         f"({exc.errors()[0]['msg']})") from None
    dreg_attrs = {"direction": [list(r) for r in grids[0].direction]}
    dreg_attrs.update(dreg_attributes or {})
    attrs["dreg"] = dreg_attrs
    kind = f"displacement_field/{dreg_attrs.get('mapping')}" if displacement else IMAGE
    check_can_create(uri, kind, overwrite)
    try:
        group = zarr.open_group(
            storage.zarr_store(uri), mode="w" if overwrite else "w-", zarr_format=3
        )
    except Exception as exc:  # noqa: BLE001
        if "exists" in str(exc).lower() or isinstance(exc, FileExistsError):
            raise InputError(f"{uri}: already exists (pass --overwrite to replace it)") from None
        raise StorageError(storage.describe_storage_failure(uri, exc)) from None
    group.attrs.update(attrs)
    # NGFF 0.5 asks every array for dimension_names, equal to the axes' names.
    dimension_names = (("c",) if components is not None else ()) + SPATIAL_AXES
    levels = []
    for k, grid in enumerate(grids):
        shape = grid.shape_zyx
        level_chunks = tuple(min(c, s) for c, s in zip(chunk_zyx, shape, strict=True))
        if components is not None:
            shape, level_chunks = (components, *shape), (components, *level_chunks)
        group.create_array(
            str(k), shape=shape, chunks=level_chunks, dtype=dtype, fill_value=fill_value,
            dimension_names=dimension_names, compressors=_compressors(compressed),
        )
        levels.append(ImageLevel(str(k), grid, level_chunks[-3:], str(np.dtype(dtype))))
    return OmeZarrImage(uri=uri, levels=tuple(levels), components=components,
                        attributes=dreg_attrs, ome_version=attrs["ome"]["version"], unit=unit)


def _compressors(compressed: bool) -> tuple:
    """zstd (zarr's default, level 0) or nothing, then a crc32c of the stored bytes."""
    return (ZstdCodec(), Crc32cCodec()) if compressed else (Crc32cCodec(),)


def write_region(image: OmeZarrImage, level: int, region: Region, data: np.ndarray,
                 array: zarr.Array | None = None) -> None:
    """Write a box of voxels. The caller owns every chunk the box touches.

    Chunks of a raw array (no compressor but the checksum: displacement fields) are
    stored even when they hold only the fill value: zarr's check for that scans the whole
    chunk (a third of the time to write a 64³ field chunk, more than half for an edge
    chunk); a compressed array skips them, as zarr does by default. `array` is the level
    opened by `open_level` with mode "r+" (default: opened here)."""
    array = _open_array(image, level, mode="r+") if array is None else array
    if all(isinstance(codec, Crc32cCodec) for codec in array.compressors):
        array = array.with_config({"write_empty_chunks": True})
    index = (slice(None),) + tuple(region) if image.components is not None else tuple(region)
    array[index] = data.astype(array.dtype, copy=False)


def chunk_regions(shape_zyx: Sequence[int], chunks_zyx: Sequence[int]) -> Iterator[Region]:
    """Every chunk of a grid as a region, in C order."""
    ranges = [range(0, n, c) for n, c in zip(shape_zyx, chunks_zyx, strict=True)]
    for start in product(*ranges):
        yield tuple(
            slice(s, min(s + c, n))
            for s, c, n in zip(start, chunks_zyx, shape_zyx, strict=True)
        )


def write_chunks(
    image: OmeZarrImage,
    level: int,
    regions: Iterable[Region],
    compute: Callable[[Region], np.ndarray],
    workers: int = 2,
) -> None:
    """Write each region (whole chunks) with the voxels ``compute(region)`` returns,
    `workers` regions at a time.

    The queue is bounded, so at most a few regions' voxels are in memory at once (plus
    what `compute` reads): the one thread-pool chunk writer of the project.
    """

    def one(region: Region) -> None:
        write_region(image, level, region, compute(region))

    if workers <= 1:
        for region in regions:
            one(region)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for region in regions:
            pending.append(pool.submit(one, region))
            if len(pending) >= 4 * workers:
                pending.pop(0).result()
        for future in pending:
            future.result()


def write_level_by_chunks(
    image: OmeZarrImage,
    level: int,
    compute: Callable[[Region], np.ndarray],
    workers: int = 2,
) -> None:
    """Fill a level chunk by chunk: ``compute(region)`` returns that chunk's voxels."""
    lv = image.level(level)
    write_chunks(image, level, chunk_regions(lv.grid.shape_zyx, lv.chunks_zyx), compute, workers)


