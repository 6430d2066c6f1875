"""Import a 3D image file as an OME-Zarr 0.5 multiscale image, out of core.

The header is read first, without voxels; level 0 is then copied one box at a time (a
box is a run of whole output chunks, at most BOX_BYTES), and the pyramid is built from
level 0 chunk by chunk. How each format's voxels are read:

- MetaImage (.mha, .mhd) without compression and NIfTI (.nii, .nii.gz): ITK streaming,
  which reads only the requested box. For .nii.gz ITK decompresses the stream up to the
  box each time: memory stays bounded, time grows with the file. NIfTI files are first
  checked to hold all the voxels their header announces (ITK would read zeros instead).
- NRRD (.nrrd, .nhdr) with raw encoding: ITK reads the header; each box's slices are
  read from the file directly, because ITK's NRRD reader always reads the whole file.
- TIFF (.tif, .tiff): tifffile as a zarr store, so only the pages a box needs are read.
  Pages are z, rows y, columns x. Spacing comes from ImageJ or OME metadata (else 1);
  origin is 0 and direction identity (TIFF has no such fields).
- Compressed MetaImage and gzip/bzip2 NRRD: ITK cannot read part of these, so the whole
  image is read into memory once (the only case that needs memory of the image's size).

Spacing, origin and direction come from ITK unchanged (x, y, z order); arrays are z, y, x.
Integer voxel types are kept.
"""

from __future__ import annotations

import gzip
import os
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dreg.errors import InputError, first_line
from dreg.grid import Grid, Region, region_shape, relative_region, xyz_to_zyx, zyx_to_xyz
from dreg.io import ome_zarr, pyramid, storage

BOX_BYTES = 32 * 2**20  # peak memory of reading one box
ITK_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
TIFF_SUFFIXES = (".tif", ".tiff")
SUPPORTED_SUFFIXES = ITK_SUFFIXES + TIFF_SUFFIXES

# ITK component type names -> NumPy dtypes.
_ITK_COMPONENT_DTYPES = {
    "unsigned_char": np.uint8,
    "char": np.int8,
    "unsigned_short": np.uint16,
    "short": np.int16,
    "unsigned_int": np.uint32,
    "int": np.int32,
    "unsigned_long": np.uint64,
    "long": np.int64,
    "unsigned_long_long": np.uint64,
    "long_long": np.int64,
    "float": np.float32,
    "double": np.float64,
}


@dataclass
class Source:
    """An input image opened for reading boxes of voxels.

    `array` is anything sliceable by a (z, y, x) tuple of slices that returns the voxels:
    a NumPy array, a raw-file reader, a zarr array over a TIFF, or an ITK streaming
    reader. `method` says which, for messages and tests. `read_bytes_per_voxel` is the
    memory a box read holds at its peak, per voxel of the box (copies included); it
    sizes the boxes.
    """

    path: str
    grid: Grid
    dtype: np.dtype
    method: str
    array: object
    handle: object = None  # closed by close()
    read_bytes_per_voxel: int = 0

    def __post_init__(self) -> None:
        # By default a read holds the data twice: the reader's buffer and the result.
        if not self.read_bytes_per_voxel:
            self.read_bytes_per_voxel = 2 * self.dtype.itemsize

    def read(self, box: Region) -> np.ndarray:
        """The voxels of a box, in the image's dtype, as a NumPy array."""
        try:
            data = self.array[box]
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file: say so, naming it
            raise InputError(f"{self.path}: cannot read voxels ({first_line(exc)})") from None
        return np.asarray(data).astype(self.dtype, copy=False)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


# ----------------------------------------------------------------------------- helpers


def _suffix(path: str) -> str | None:
    lower = path.lower()
    return next((s for s in SUPPORTED_SUFFIXES if lower.endswith(s)), None)


def _check_input(path: str) -> str:
    if storage.is_s3(path) or "://" in path:
        raise InputError(f"{path}: convert reads local files only")
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a file")
    suffix = _suffix(path)
    if suffix is None:
        expected = ", ".join(SUPPORTED_SUFFIXES)
        raise InputError(f"{path}: unsupported format (expected one of {expected})")
    return suffix


@contextmanager
def _native_stderr_captured() -> Iterator[list[str]]:
    """Capture what C/C++ code writes to file descriptor 2 inside the block.

    ITK's readers (MetaIO, niftilib) print diagnostics straight to stderr; a failure
    must still be one line. The list yielded receives the captured lines at the end.
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _require_3d(path: str, sizes_xyz: list[int], components: int) -> None:
    if len(sizes_xyz) != 3:
        raise InputError(
            f"{path}: needs a 3D image; it has {len(sizes_xyz)} dimensions (sizes {sizes_xyz})"
        )
    if components != 1:
        raise InputError(
            f"{path}: needs a scalar image; it has {components} components per voxel"
        )


# ----------------------------------------------------------------------------- ITK formats


@dataclass(frozen=True)
class _ItkHeader:
    grid: Grid
    dtype: np.dtype
    can_stream: bool


def _read_itk_header(path: str) -> _ItkHeader:
    """Geometry and voxel type from ITK's ImageIO, without reading voxels."""
    import itk

    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise InputError(f"{path}: unreadable image header (ITK recognises no format in it)")
    io.SetFileName(path)
    try:
        with _native_stderr_captured() as printed:
            io.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: unreadable image header ({first_line(exc)})") from None
    for line in printed:  # warnings about a header that was read: pass them on
        print(f"dreg: ITK: {line}", file=sys.stderr)
    ndim = io.GetNumberOfDimensions()
    sizes = [int(io.GetDimensions(i)) for i in range(ndim)]
    _require_3d(path, sizes, int(io.GetNumberOfComponents()))
    component = io.GetComponentTypeAsString(io.GetComponentType())
    if component not in _ITK_COMPONENT_DTYPES:
        raise InputError(f"{path}: unsupported voxel type '{component}'")
    # ImageIO's direction i is the world direction of index axis i: a column of the matrix.
    columns = [[float(v) for v in io.GetDirection(i)] for i in range(3)]
    try:
        grid = Grid(
            shape_zyx=xyz_to_zyx(sizes),
            spacing_xyz=tuple(float(io.GetSpacing(i)) for i in range(3)),
            origin_xyz=tuple(float(io.GetOrigin(i)) for i in range(3)),
            direction=tuple(tuple(columns[c][r] for c in range(3)) for r in range(3)),
        )
    except ValueError as exc:
        raise InputError(f"{path}: unusable image geometry ({exc})") from None
    # NIfTI reads only the requested region although its ImageIO does not say so
    # (measured: the memory of a box, not of the file, also for .nii.gz).
    can_stream = bool(io.CanStreamRead()) or io.GetNameOfClass() == "NiftiImageIO"
    return _ItkHeader(grid, np.dtype(_ITK_COMPONENT_DTYPES[component]), can_stream)


def _itk_read_type(dtype: np.dtype) -> tuple[object, np.dtype] | None:
    """The wrapped ITK pixel type to read a voxel type through, and its NumPy dtype.

    Exact where ITK's Python wrapping has the type; otherwise a wider type that holds
    every value exactly (the caller casts back). None for 64-bit integers.
    """
    import itk

    read_as = {
        np.uint8: (itk.UC, np.uint8), np.uint16: (itk.US, np.uint16),
        np.int16: (itk.SS, np.int16), np.float32: (itk.F, np.float32),
        np.float64: (itk.D, np.float64), np.int8: (itk.SS, np.int16),
        np.uint32: (itk.D, np.float64), np.int32: (itk.D, np.float64),
    }
    found = read_as.get(dtype.type)
    return None if found is None else (found[0], np.dtype(found[1]))


class _ItkStreamingArray:
    """Boxes read with ITK's streaming: only the requested region is read from the file."""

    def __init__(self, path: str, pixel_type) -> None:
        self.path = path
        self.pixel_type = pixel_type

    def __getitem__(self, box: Region) -> np.ndarray:
        import itk

        image_type = itk.Image[self.pixel_type, 3]
        reader = itk.ImageFileReader[image_type].New(FileName=self.path)
        region = itk.ImageRegion[3]()
        region.SetIndex([int(s.start) for s in zyx_to_xyz(box)])
        region.SetSize([int(s.stop - s.start) for s in zyx_to_xyz(box)])
        extract = itk.ExtractImageFilter[image_type, image_type].New(
            Input=reader.GetOutput(), ExtractionRegion=region
        )
        # Not in place (the default): in place, the output would share the reader's
        # buffer, which may be larger than the box, and its layout came out wrong.
        extract.InPlaceOff()
        try:
            with _native_stderr_captured():
                extract.Update()
        except RuntimeError as exc:
            raise InputError(f"{self.path}: cannot read voxels ({first_line(exc)})") from None
        # A copy that NumPy owns: a view's memory belongs to the pipeline, and NumPy's
        # views of views lose the reference that would keep the pipeline alive.
        return itk.array_from_image(extract.GetOutput())


def _read_whole_with_itk(path: str, pixel_type) -> np.ndarray:
    import itk

    try:
        with _native_stderr_captured():
            image = itk.imread(path, pixel_type)
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read voxels ({first_line(exc)})") from None
    return itk.array_view_from_image(image)


def _open_itk(path: str, suffix: str) -> Source:
    header = _read_itk_header(path)
    read_type = _itk_read_type(header.dtype)
    if suffix in (".nrrd", ".nhdr"):
        raw = _raw_nrrd(path, header)
        if raw is not None:
            return Source(path, header.grid, header.dtype, "raw-nrrd", raw)
    if read_type is None:
        raise InputError(f"{path}: 64-bit integer voxels are not supported")
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    pixel_type, read_dtype = read_type
    if header.can_stream:
        array = _ItkStreamingArray(path, pixel_type)
        # The reader's buffer, the extract filter's output and its copy, then the cast.
        per_voxel = 3 * read_dtype.itemsize + header.dtype.itemsize
        return Source(path, header.grid, header.dtype, "itk-streaming", array,
                      read_bytes_per_voxel=per_voxel)
    whole = _read_whole_with_itk(path, pixel_type)
    return Source(path, header.grid, header.dtype, "itk-whole", whole)


# ----------------------------------------------------------------------------- NIfTI


def _nifti_data_end(header: bytes) -> int | None:
    """Where a NIfTI-1 or NIfTI-2 single file's voxel data ends, from its header; None
    when the header is not one of those."""
    for order in "<>":
        size = int(np.frombuffer(header[:4], dtype=f"{order}i4")[0]) if len(header) >= 4 else 0
        if size == 348 and len(header) >= 348:
            dims = np.frombuffer(header[40:56], dtype=f"{order}i2")
            bitpix = int(np.frombuffer(header[72:74], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(header[108:112], dtype=f"{order}f4")[0])
        elif size == 540 and len(header) >= 540:
            dims = np.frombuffer(header[16:80], dtype=f"{order}i8")
            bitpix = int(np.frombuffer(header[14:16], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(header[168:176], dtype=f"{order}i8")[0])
        else:
            continue
        count = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + int(dims[0])]]))
        return max(offset, size) + count * bitpix // 8
    return None


def _check_nifti_complete(path: str) -> None:
    """Fail when a NIfTI file holds fewer voxel bytes than its header says.

    ITK's NIfTI reader fills the missing part of a truncated file with zeros, silently.
    For .nii.gz this decompresses the file once (streaming, constant memory).
    """
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(540)
            end = _nifti_data_end(header)
            if end is None:
                return  # not a single-file NIfTI-1/2: leave it to ITK
            if opener is open:
                available = os.path.getsize(path)
            else:
                available = len(header)
                while block := handle.read(16 * 2**20):
                    available += len(block)
    except (OSError, EOFError) as exc:  # gzip reports a cut stream as EOFError
        raise InputError(f"{path}: cannot read voxels ({first_line(exc)})") from None
    if available < end:
        raise InputError(f"{path}: truncated file ({available} bytes; its header needs {end})")


# ----------------------------------------------------------------------------- raw NRRD


def _nrrd_fields(path: str) -> tuple[dict[str, str], int]:
    """The header fields of a NRRD file and the byte offset just after the header."""
    fields: dict[str, str] = {}
    with open(path, "rb") as handle:
        magic = handle.readline()
        if not magic.startswith(b"NRRD"):
            return {}, 0
        while True:
            line = handle.readline()
            if not line or line in (b"\n", b"\r\n"):
                return fields, handle.tell()
            text = line.decode("latin-1").rstrip("\r\n")
            if text.startswith("#") or ":=" in text or ":" not in text:
                continue
            key, value = text.split(":", 1)
            fields[key.strip().lower().replace(" ", "")] = value.strip()


class _RawArray:
    """Boxes of a raw block of voxels in a file (C order, z slowest): for each slice of a
    box, its run of rows is one contiguous read."""

    def __init__(self, path: str, offset: int, dtype: np.dtype, shape_zyx) -> None:
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, tuple(shape_zyx)

    def __getitem__(self, box: Region) -> np.ndarray:
        zs, ys, xs = box
        _, ny, nx = self.shape
        rows = ys.stop - ys.start
        out = np.empty((zs.stop - zs.start, rows, xs.stop - xs.start), dtype=self.dtype)
        with open(self.path, "rb") as handle:
            for k, z in enumerate(range(zs.start, zs.stop)):
                handle.seek(self.offset + (z * ny + ys.start) * nx * self.dtype.itemsize)
                run = np.fromfile(handle, dtype=self.dtype, count=rows * nx)
                out[k] = run.reshape(rows, nx)[:, xs]
        return out


def _raw_nrrd(path: str, header: _ItkHeader) -> _RawArray | None:
    """A reader of a raw-encoded NRRD's voxels, or None when the file's layout is not a
    single raw block (compressed, several data files, line skips)."""
    fields, header_end = _nrrd_fields(path)
    if fields.get("encoding", "").lower() != "raw" or int(fields.get("lineskip", "0")) != 0:
        return None
    data_file = fields.get("datafile")
    if data_file is None:
        data_path, offset = path, header_end
    elif data_file.startswith("LIST") or len(data_file.split()) > 1:
        return None
    else:
        data_path, offset = str(Path(path).parent / data_file), 0
    order = ">" if fields.get("endian", "little").lower() == "big" else "<"
    dtype = header.dtype.newbyteorder(order)
    count = int(np.prod(header.grid.shape_zyx)) * dtype.itemsize
    size = os.path.getsize(data_path) if os.path.isfile(data_path) else -1
    skip = int(fields.get("byteskip", "0"))
    offset = size - count if skip == -1 else offset + skip
    if offset < 0 or size < offset + count:
        return None
    return _RawArray(data_path, offset, dtype, header.grid.shape_zyx)


# ----------------------------------------------------------------------------- TIFF


def _tiff_spacing_xyz(tiff) -> tuple[float, float, float]:
    """Voxel spacing from OME or ImageJ metadata; 1 where the file does not say."""
    if tiff.is_ome and tiff.ome_metadata:
        root = ElementTree.fromstring(tiff.ome_metadata)
        pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
        if pixels is not None:
            return tuple(float(pixels.get(f"PhysicalSize{a}", 1.0)) for a in "XYZ")
    if tiff.is_imagej:
        page = tiff.pages[0]

        def from_resolution(tag: str) -> float:
            value = page.tags.get(tag)
            if value is None:
                return 1.0
            numerator, denominator = value.value
            return denominator / numerator if numerator else 1.0

        z = float((tiff.imagej_metadata or {}).get("spacing", 1.0))
        return from_resolution("XResolution"), from_resolution("YResolution"), z
    return 1.0, 1.0, 1.0


def _open_tiff(path: str) -> Source:
    import tifffile
    import zarr

    try:
        tiff = tifffile.TiffFile(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable file
        raise InputError(f"{path}: unreadable TIFF ({first_line(exc)})") from None
    try:
        series = tiff.series[0]
        axes = series.axes
        if "S" in axes or "C" in axes:
            raise InputError(f"{path}: needs a scalar 3D image; the TIFF has axes {axes} "
                             f"(shape {list(series.shape)})")
        _require_3d(path, list(zyx_to_xyz(series.shape)), 1)
        spacing = _tiff_spacing_xyz(tiff)
        try:
            grid = Grid(shape_zyx=series.shape, spacing_xyz=spacing)
        except ValueError as exc:
            raise InputError(f"{path}: unusable image geometry ({exc})") from None
        array = zarr.open_array(series.aszarr(level=0), mode="r")
        dtype = np.dtype(series.dtype).newbyteorder("=")
    except BaseException:
        tiff.close()
        raise
    return Source(path, grid, dtype, "tifffile-zarr", array, handle=tiff)


# ----------------------------------------------------------------------------- convert


def open_source(input_path: str | os.PathLike) -> Source:
    """Open an image file for reading boxes: header only, no voxels yet (except for the
    formats ITK cannot read in parts; see the module docstring).

    Raises InputError naming the file when it is missing, of an unsupported format,
    unreadable, or not a scalar 3D image.
    """
    path = str(input_path)
    suffix = _check_input(path)
    if suffix in TIFF_SUFFIXES:
        return _open_tiff(path)
    return _open_itk(path, suffix)


def boxes(
    shape_zyx: tuple[int, int, int], chunks_zyx: tuple[int, int, int], itemsize: int,
    budget: int = BOX_BYTES,
) -> Iterator[Region]:
    """Boxes of whole chunks covering a grid, each at most about `budget` bytes.

    A box is one chunk deep in z, as wide in x as the budget allows (whole rows are
    contiguous in most files), then as tall in y as the budget allows.
    """
    nz, ny, nx = shape_zyx
    cz, cy, cx = chunks_zyx
    per_x = cz * cy * itemsize
    bx = nx if per_x * nx <= budget else max(cx, budget // per_x // cx * cx)
    by = cy if bx < nx else min(ny, max(cy, budget // (cz * nx * itemsize) // cy * cy))
    for z in range(0, nz, cz):
        for y in range(0, ny, by):
            for x in range(0, nx, bx):
                yield (slice(z, min(z + cz, nz)), slice(y, min(y + by, ny)),
                       slice(x, min(x + bx, nx)))


def _write_level0(image: ome_zarr.OmeZarrImage, source: Source, workers: int) -> None:
    """Copy the source into level 0, box by box; a box's chunks are written in parallel."""
    level = image.level(0)
    for box in boxes(level.grid.shape_zyx, level.chunks_zyx, source.read_bytes_per_voxel):
        data = source.read(box)
        chunks = [
            tuple(slice(c.start + b.start, c.stop + b.start)
                  for c, b in zip(chunk, box, strict=True))
            for chunk in ome_zarr.chunk_regions(region_shape(box), level.chunks_zyx)
        ]
        ome_zarr.write_chunks(image, 0, chunks, lambda chunk, b=box, d=data:
                              d[relative_region(chunk, b)], max(1, workers))
        del data


def convert(
    input_path: str | os.PathLike,
    out_uri: str,
    chunks: int = ome_zarr.DEFAULT_CHUNK,
    workers: int = 2,
    overwrite: bool = False,
) -> ome_zarr.OmeZarrImage:
    """Convert a .nii/.nii.gz/.mha/.mhd/.nrrd/.nhdr/.tif/.tiff image to OME-Zarr 0.5 at
    `out_uri` (local path or s3://), with a pyramid down to a longest axis of 64 voxels.

    `chunks` is the chunk edge in voxels, `workers` the number of chunks processed in
    parallel. An existing output is replaced only with `overwrite`. If the conversion
    fails part way, the partial output is removed.
    """
    if chunks < 1 or workers < 1:
        raise InputError(f"chunks and workers must be positive (got {chunks}, {workers})")
    source = open_source(input_path)
    try:
        name = Path(source.path).name
        image = ome_zarr.create_image(
            out_uri,
            pyramid.pyramid_grids(source.grid),
            source.dtype,
            chunks=chunks,
            name=name,
            overwrite=overwrite,
            dreg_attributes={"source": {"file": name, "reader": source.method}},
        )
        try:
            _write_level0(image, source, workers)
            pyramid.build_pyramid(image, workers=workers)
        except BaseException:
            # A half-written image would pass for a converted one.
            storage.remove_tree(image.uri)
            raise
    finally:
        source.close()
    return image
