"""Reading OME-Zarr images: open an image's metadata (0.5 on zarr v3, 0.4 on zarr v2),
read a region of voxels, and name the chunk to blame when a read fails."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import product

import numpy as np
import zarr

from dreg.errors import InputError, StorageError, describe
from dreg.grid import Grid, Region, zyx_to_xyz
from dreg.io import storage
from dreg.io.ome_zarr.metadata import (
    ImageLevel,
    OmeZarrImage,
    _axes,
    _check_axes,
    _dataset_transform,
    _multiscales,
)

MAX_CHUNKS_PROBED = 64  # when a read fails, chunks tried one by one to name the bad one
# zarr's crc32c codec raises ValueError with this text when a chunk's bytes changed.
CHECKSUM_MISMATCH = "checksum do not match"
# What metadata may claim, checked before anything is listed or read: a header is a few
# bytes, and a claimed 10^5 x 10^5 x 10^5 image would otherwise make planning list (or a
# step allocate) beyond any machine. The largest volumes this serves are a few 10^12
# voxels; chunks are MiB, not GiB; a pyramid halves, so 32 levels span 2^32.
MAX_LEVEL_VOXELS = 2**45
MAX_LEVEL_CHUNKS = 2**27
MAX_CHUNK_BYTES = 2**30
MAX_LEVELS = 32


def _check_claims(uri: str, path: str, array: zarr.Array) -> None:
    """Refuse a level whose metadata claims more voxels, chunks or bytes per chunk than
    any run could handle, naming the level and the bound."""
    shape = [int(n) for n in array.shape]
    chunks = [max(1, int(c)) for c in array.chunks]
    voxels = int(np.prod(shape[-3:], dtype=object))
    if voxels > MAX_LEVEL_VOXELS:
        raise InputError(f"{uri}: level '{path}' claims {'x'.join(map(str, shape))} = "
                         f"{voxels:.3g} voxels, more than dreg accepts ({MAX_LEVEL_VOXELS:.3g})")
    count = int(np.prod([-(-n // c) for n, c in zip(shape, chunks, strict=True)], dtype=object))
    if count > MAX_LEVEL_CHUNKS:
        raise InputError(f"{uri}: level '{path}' has {count:.3g} chunks of "
                         f"{'x'.join(map(str, chunks))}, more than dreg accepts "
                         f"({MAX_LEVEL_CHUNKS:.3g}); use larger chunks")
    try:
        itemsize = np.dtype(str(array.dtype)).itemsize
    except TypeError:
        itemsize = 8
    nbytes = int(np.prod(chunks, dtype=object)) * itemsize
    if nbytes > MAX_CHUNK_BYTES:
        raise InputError(f"{uri}: level '{path}' has chunks of {'x'.join(map(str, chunks))} "
                         f"({nbytes / 2**20:.0f} MiB each), more than dreg accepts "
                         f"({MAX_CHUNK_BYTES // 2**20} MiB)")

def _open_group(uri: str) -> zarr.Group:
    """The root zarr group (v3 or v2), or an error naming what is there instead."""
    try:
        return zarr.open_group(storage.zarr_store(uri, read_only=True), mode="r")
    except zarr.errors.GroupNotFoundError:
        raise InputError(
            f"{uri}: not an OME-Zarr image (no zarr group metadata: zarr.json or .zgroup)"
        ) from None
    except zarr.errors.ContainsArrayError:
        raise InputError(
            f"{uri}: a zarr array, not an OME-Zarr image (open the multiscale group above it)"
        ) from None
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(f"{uri}: unreadable zarr metadata ({describe(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - storage failures become one clear line
        raise StorageError(storage.describe_storage_failure(uri, exc)) from None


def _open_level_array(uri: str, group: zarr.Group, path: str) -> zarr.Array:
    try:
        array = group[path]
    except KeyError:
        raise InputError(f"{uri}: level '{path}' is missing") from None
    except Exception as exc:  # noqa: BLE001 - storage failures become one clear line
        raise StorageError(storage.describe_storage_failure(f"{uri}/{path}", exc)) from None
    if not isinstance(array, zarr.Array):
        raise InputError(f"{uri}: level '{path}' is not an array")
    return array


def _image_from_group(uri: str, group: zarr.Group) -> OmeZarrImage:
    attrs = dict(group.attrs)
    try:
        multiscale, version = _multiscales(attrs)
    except (KeyError, IndexError, TypeError):
        raise InputError(f"{uri}: not an OME-Zarr image (no multiscales metadata)") from None
    axis_specs = _axes(multiscale)
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in axis_specs]
    _check_axes(uri, axes)
    units = {a.get("unit") for a in axis_specs if isinstance(a, dict) and a.get("type") == "space"}
    dreg_attrs = dict(attrs.get("dreg") or {})
    direction = dreg_attrs.get("direction") or (dreg_attrs.get("grid") or {}).get("direction")
    direction = direction or [[1, 0, 0], [0, 1, 0], [0, 0, 1]]

    levels = []
    components = None
    if len(multiscale["datasets"]) > MAX_LEVELS:
        raise InputError(f"{uri}: {len(multiscale['datasets'])} levels, more than dreg "
                         f"accepts ({MAX_LEVELS})")
    for dataset in multiscale["datasets"]:
        path = str(dataset["path"])
        array = _open_level_array(uri, group, path)
        if array.ndim != len(axes):
            raise InputError(f"{uri}: level '{path}' has {array.ndim} dimensions, axes say {axes}")
        _check_claims(uri, path, array)
        scale, translation = _dataset_transform(multiscale, dataset, len(axes))
        if len(axes) == 4:
            components = int(array.shape[0])
        grid = Grid(
            shape_zyx=array.shape[-3:],
            spacing_xyz=zyx_to_xyz(scale[-3:]),
            origin_xyz=zyx_to_xyz(translation[-3:]),
            direction=tuple(tuple(r) for r in direction),
        )
        chunks = tuple(int(c) for c in array.chunks[-3:])
        levels.append(ImageLevel(path=path, grid=grid, chunks_zyx=chunks, dtype=str(array.dtype)))
    if not levels:
        raise InputError(f"{uri}: the OME-Zarr image has no levels")
    return OmeZarrImage(
        uri=uri,
        levels=tuple(levels),
        components=components,
        attributes=dreg_attrs,
        ome_version=version,
        unit=units.pop() if len(units) == 1 else None,
    )


def open_image(uri: str, require_scalar: bool = False) -> OmeZarrImage:
    """Read an OME-Zarr multiscale image's metadata (no voxels): 0.5 on zarr v3, or 0.4
    on zarr v2.

    Raises InputError naming the URI when it is missing, not OME-Zarr, has unreadable
    metadata, or is not 3D; StorageError when the storage cannot be reached or read.
    """
    uri = storage.normalize_uri(uri)
    if not storage.exists(uri):
        raise InputError(f"{uri}: no such image (path does not exist)")
    group = _open_group(uri)
    try:
        image = _image_from_group(uri, group)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"{uri}: unreadable OME-Zarr metadata ({describe(exc)})") from None
    if require_scalar and image.components is not None:
        raise InputError(f"{uri}: needs a scalar 3D image; it has a c axis of {image.components}")
    return image


def _open_array(image: OmeZarrImage, level: int, mode: str = "r") -> zarr.Array:
    store = storage.zarr_store(image.uri, read_only=(mode == "r"))
    # Naming the zarr format spares the probes for the other one: on S3, four requests
    # before every read or write otherwise.
    return zarr.open_array(
        store, path=image.level(level).path, mode=mode, zarr_format=image.zarr_format
    )


def open_level(image: OmeZarrImage, level: int, mode: str = "r") -> zarr.Array:
    """A level's zarr array, opened once for many reads (or, with mode "r+", writes) of
    one batch: opening costs a round trip to the store (1 to 3 ms locally)."""
    return _open_array(image, level, mode)


def read_region(image: OmeZarrImage, level: int, region: Region,
                array: zarr.Array | None = None) -> np.ndarray:
    """Read a box of voxels (z, y, x slices) at a level; only the chunks it touches.

    A vector image returns (c, z, y, x). A chunk that cannot be decoded, or whose
    checksum does not match its bytes (written by this project: every chunk carries a
    crc32c), raises StorageError naming the image, the level and the chunk. `array` is
    the level opened by `open_level` (default: opened here).
    """
    array = _open_array(image, level) if array is None else array
    index = (slice(None),) + tuple(region) if image.components is not None else tuple(region)
    try:
        return np.asarray(array[index])
    except Exception as exc:  # noqa: BLE001
        raise StorageError(_read_failure(image, level, region, array, exc),
                           transient=storage.is_transient(exc)) from None


def _chunk_failure(exc: BaseException) -> str:
    """Why a chunk could not be read, in words: a checksum mismatch is corruption."""
    if CHECKSUM_MISMATCH in str(exc):
        return "corrupt (its crc32c checksum does not match its bytes)"
    return f"cannot be read: {describe(exc)}"


def _read_failure(image: OmeZarrImage, level: int, region: Region, array: zarr.Array,
                  exc: BaseException) -> str:
    """One line naming what could not be read: the chunk to blame, when one chunk is (an
    undecodable or corrupt chunk), else the image (an unreachable store, refused access)."""
    cause = storage.describe_storage_failure(image.uri, exc)
    if not cause.startswith(f"{image.uri}: {type(exc).__name__}"):
        return cause  # reaching the store failed: trying chunk by chunk would only wait
    chunks = image.level(level).chunks_zyx
    lead = (slice(None),) if image.components is not None else ()
    for chunk in list(_chunks_meeting(region, chunks))[:MAX_CHUNKS_PROBED]:
        try:
            array[lead + chunk]
        except Exception as chunk_exc:  # noqa: BLE001 - this is the chunk to name
            where = tuple(s.start // c for s, c in zip(chunk, chunks, strict=True))
            return (f"{image.uri}: level {level} (array '{image.level(level).path}'), chunk "
                    f"{where} (z, y, x) {_chunk_failure(chunk_exc)}")
    return cause


def _chunks_meeting(region: Region, chunks_zyx: Sequence[int]) -> Iterator[Region]:
    """The chunk-aligned boxes of a level's chunk grid that meet `region`."""
    ranges = [range(s.start // c * c, s.stop, c) for s, c in zip(region, chunks_zyx,
                                                                  strict=True)]
    for start in product(*ranges):
        yield tuple(slice(a, a + c) for a, c in zip(start, chunks_zyx, strict=True))


