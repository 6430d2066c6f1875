"""OME-Zarr multiscale images: open, read a region, create, write region by region.

Writes OME-Zarr 0.5 on zarr v3; reads 0.5 (zarr v3) and 0.4 (zarr v2). The image is a
small dataclass of metadata; voxels are read and written per region, so nothing here
ever holds a whole level in memory. The NGFF metadata is a few JSON keys written here
directly: the arrays themselves go through zarr-python.

A non-identity direction (not part of NGFF) is kept in the root attributes under
``dreg.direction``; displacement fields carry DESIGN.md's full ``dreg`` object.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from dreg.errors import InputError, StorageError, describe
from dreg.grid import Grid, Region, xyz_to_zyx, zyx_to_xyz
from dreg.io import storage

SPATIAL_AXES = ("z", "y", "x")
DEFAULT_CHUNK = 64
DISPLACEMENT_OME_VERSION = "0.6rc0"
MAX_CHUNKS_PROBED = 64  # when a read fails, chunks tried one by one to name the bad one
# zarr's crc32c codec raises ValueError with this text when a chunk's bytes changed.
CHECKSUM_MISMATCH = "checksum do not match"


@dataclass(frozen=True)
class ImageLevel:
    """One resolution level: its array path, grid, chunk shape and dtype."""

    path: str
    grid: Grid
    chunks_zyx: tuple[int, int, int]
    dtype: str


@dataclass(frozen=True)
class OmeZarrImage:
    """An OME-Zarr multiscale image's metadata; voxels stay in storage.

    `components` is None for a scalar image and the length of the c axis for a vector
    image (axes c, z, y, x). `attributes` is the root's ``dreg`` object, if any.
    `ome_version` is the NGFF version the metadata declares ("0.5", "0.4").
    """

    uri: str
    levels: tuple[ImageLevel, ...]
    components: int | None = None
    attributes: dict = field(default_factory=dict)
    ome_version: str = "0.5"
    unit: str | None = None

    @property
    def zarr_format(self) -> int:
        """The zarr format of the arrays: NGFF 0.4 and earlier are zarr v2, 0.5 is v3."""
        major, minor = (int(re.match(r"\d*", p).group() or 0)
                        for p in (self.ome_version.split(".") + ["0"])[:2])
        return 2 if (major, minor) <= (0, 4) else 3

    def level(self, index: int) -> ImageLevel:
        """Level `index`; negative values count from the coarsest (-1 is the coarsest)."""
        count = len(self.levels)
        if not -count <= index < count:
            raise InputError(
                f"{self.uri}: level {index} does not exist (the image has levels 0..{count - 1})"
            )
        return self.levels[index]

    def level_number(self, index: int) -> int:
        self.level(index)
        return index % len(self.levels)

    def describe(self) -> dict:
        """Metadata as plain JSON (what `dreg info` prints)."""
        return {
            "uri": self.uri,
            "components": self.components,
            "unit": self.unit,
            "direction": [list(r) for r in self.levels[0].grid.direction],
            "levels": [
                {
                    "path": lv.path,
                    "shape_zyx": list(lv.grid.shape_zyx),
                    "spacing_xyz": list(lv.grid.spacing_xyz),
                    "origin_xyz": list(lv.grid.origin_xyz),
                    "chunks_zyx": list(lv.chunks_zyx),
                    "dtype": lv.dtype,
                }
                for lv in self.levels
            ],
        }


# ----------------------------------------------------------------------------- reading


def _multiscales(attrs: dict) -> tuple[dict, str]:
    """The first multiscale of 0.5 (under "ome") or 0.4 (top level) metadata, and its
    version."""
    if "ome" in attrs and "multiscales" in attrs["ome"]:
        return attrs["ome"]["multiscales"][0], str(attrs["ome"].get("version", "0.5"))
    if "multiscales" in attrs:
        first = attrs["multiscales"][0]
        return first, str(first.get("version", "0.4"))
    raise KeyError("multiscales")


def _flattened(transforms: Sequence[dict]) -> list[dict]:
    """A transform list with NGFF 0.6 sequences spelled out."""
    out = []
    for t in transforms:
        out += _flattened(t["transformations"]) if t.get("type") == "sequence" else [t]
    return out


def _scale_translation(transforms: Sequence[dict], ndim: int) -> tuple[list, list]:
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for t in _flattened(transforms):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            translation = [float(v) for v in t["translation"]]
    if len(scale) != ndim or len(translation) != ndim:
        raise ValueError(f"scale and translation need {ndim} values each")
    return scale, translation


def _dataset_transform(multiscale: dict, dataset: dict, ndim: int) -> tuple[list, list]:
    """Scale and translation of one level: the dataset's own, then the multiscale's
    shared coordinateTransformations (NGFF allows both; they compose in that order)."""
    scale, translation = _scale_translation(dataset.get("coordinateTransformations", []), ndim)
    shared = multiscale.get("coordinateTransformations")
    if shared:
        outer_scale, outer_translation = _scale_translation(shared, ndim)
        scale = [s * o for s, o in zip(scale, outer_scale, strict=True)]
        translation = [
            t * o + u for t, o, u in zip(translation, outer_scale, outer_translation, strict=True)
        ]
    return scale, translation


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


def _check_axes(uri: str, axes: list[str]) -> None:
    spatial = [a for a in axes if a in SPATIAL_AXES]
    if spatial != list(SPATIAL_AXES) or len(axes) not in (3, 4) or (
        len(axes) == 4 and axes[0] != "c"
    ):
        raise InputError(
            f"{uri}: needs a 3D image with axes z, y, x (or c, z, y, x); it has axes {axes}"
        )


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
    for dataset in multiscale["datasets"]:
        path = str(dataset["path"])
        array = _open_level_array(uri, group, path)
        if array.ndim != len(axes):
            raise InputError(f"{uri}: level '{path}' has {array.ndim} dimensions, axes say {axes}")
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


def _axes(multiscale: dict) -> list:
    """The axes of 0.4/0.5 metadata, or of the first coordinate system of 0.6's."""
    if "axes" in multiscale:
        return multiscale["axes"]
    return multiscale["coordinateSystems"][0]["axes"]


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


def read_region(image: OmeZarrImage, level: int, region: Region) -> np.ndarray:
    """Read a box of voxels (z, y, x slices) at a level; only the chunks it touches.

    A vector image returns (c, z, y, x). A chunk that cannot be decoded, or whose
    checksum does not match its bytes (written by this project: every chunk carries a
    crc32c), raises StorageError naming the image, the level and the chunk.
    """
    array = _open_array(image, level)
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


# ----------------------------------------------------------------------------- writing


def _space_axes(unit: str | None) -> list[dict]:
    return [{"name": a, "type": "space", **({"unit": unit} if unit else {})}
            for a in SPATIAL_AXES]


def _level_transforms(grid: Grid, lead: int) -> list[dict]:
    return [
        {"type": "scale", "scale": [1.0] * lead + list(xyz_to_zyx(grid.spacing_xyz))},
        {"type": "translation", "translation": [0.0] * lead + list(xyz_to_zyx(grid.origin_xyz))},
    ]


def _ngff_attrs(grids: Sequence[Grid], components: int | None, name: str,
                unit: str | None) -> dict:
    """OME-Zarr 0.5 multiscales metadata (what viewers read)."""
    axes = _space_axes(unit)
    if components is not None:
        axes = [{"name": "c", "type": "channel"}] + axes
    lead = 0 if components is None else 1
    datasets = [{"path": str(k), "coordinateTransformations": _level_transforms(g, lead)}
                for k, g in enumerate(grids)]
    return {"ome": {"version": "0.5",
                    "multiscales": [{"name": name, "axes": axes, "datasets": datasets}]}}


def _displacement_attrs(grids: Sequence[Grid], name: str, unit: str | None) -> dict:
    """Displacement-field metadata as NGFF RFC-5 has it in OME-Zarr 0.6rc0: a coordinate
    system whose first axis is the vector axis, typed displacement and discrete, and each
    level mapped into it by a scale-then-translation sequence."""
    system = {"name": "physical",
              "axes": [{"name": "c", "type": "displacement", "discrete": True},
                       *_space_axes(unit)]}
    datasets = [{"path": str(k), "coordinateTransformations": [{
        "type": "sequence", "input": {"path": str(k)}, "output": {"name": "physical"},
        "transformations": _level_transforms(g, 1)}]} for k, g in enumerate(grids)]
    return {"ome": {"version": DISPLACEMENT_OME_VERSION, "multiscales": [
        {"name": name, "coordinateSystems": [system], "datasets": datasets}]}}


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
    """Create an empty OME-Zarr 0.5 multiscale image (metadata and empty arrays).

    `grids` are the levels, finest first. Voxels are written later, region by region,
    with `write_region`. The direction of the first grid is stored in ``dreg.direction``.
    Every chunk is stored with a crc32c checksum of its bytes (after zstd, when
    `compressed`), so that a chunk changed on disk is an error when read, never garbage.
    """
    uri = storage.normalize_uri(uri)
    chunk_zyx = (chunks,) * 3 if isinstance(chunks, int) else tuple(chunks)
    attrs = (_displacement_attrs(grids, name, unit) if displacement
             else _ngff_attrs(grids, components, name, unit))
    dreg_attrs = {"direction": [list(r) for r in grids[0].direction]}
    dreg_attrs.update(dreg_attributes or {})
    attrs["dreg"] = dreg_attrs
    try:
        group = zarr.open_group(
            storage.zarr_store(uri), mode="w" if overwrite else "w-", zarr_format=3
        )
    except Exception as exc:  # noqa: BLE001
        if "exists" in str(exc).lower() or isinstance(exc, FileExistsError):
            raise InputError(f"{uri}: already exists (pass overwrite to replace it)") from None
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


def write_region(image: OmeZarrImage, level: int, region: Region, data: np.ndarray) -> None:
    """Write a box of voxels. The caller owns every chunk the box touches.

    Chunks of a raw array (no compressor but the checksum: displacement fields) are
    stored even when they hold only the fill value: zarr's check for that scans the whole
    chunk (a third of the time to write a 64³ field chunk, more than half for an edge
    chunk); a compressed array skips them, as zarr does by default."""
    array = _open_array(image, level, mode="r+")
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


def update_attributes(uri: str, updates: dict) -> None:
    """Merge `updates` into an image's ``dreg`` root attributes (one small write)."""
    group = zarr.open_group(storage.zarr_store(uri), mode="r+", zarr_format=3)
    group.attrs["dreg"] = {**dict(group.attrs.get("dreg") or {}), **updates}
