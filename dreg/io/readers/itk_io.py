"""ITK's ImageIO, shared by the NIfTI, MetaImage and NRRD readers: the header without
voxels, then boxes read with ITK's streaming (only the requested region is read), or the
whole image read once when ITK cannot read part of the file (compressed MetaImage,
gzip/bzip2 NRRD). Spacing, origin and direction come from ITK unchanged (x, y, z order);
arrays are z, y, x.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from dreg.errors import InputError, first_line
from dreg.grid import Grid, Region, xyz_to_zyx, zyx_to_xyz
from dreg.io.readers.source import Source, require_3d

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


HEADER_BYTES = 1 << 16  # a NRRD or MetaImage header is text at the start of its file
# Where a header names the files that hold its voxels (NRRD, MetaImage).
DATA_FILE_FIELDS = {".nrrd": ("data file", "datafile"), ".nhdr": ("data file", "datafile"),
                    ".mha": ("elementdatafile",), ".mhd": ("elementdatafile",)}


def _named_data_files(path: str) -> list[str]:
    """The data files a NRRD or MetaImage header names (a single file, a LIST of files
    on the lines after it, or a numbered pattern such as slice%03d.raw 1 10 1), as
    written; LOCAL (voxels in the header's own file) names none."""
    fields = DATA_FILE_FIELDS.get(os.path.splitext(path)[1].lower())
    if not fields:
        return []
    with open(path, "rb") as handle:
        text = handle.read(HEADER_BYTES).decode("latin-1")
    lines = text.splitlines()
    for at, line in enumerate(lines):
        key, separator, value = line.partition("=" if path.lower().endswith((".mha", ".mhd"))
                                               else ":")
        if not separator or key.strip().lower() not in fields:
            continue
        value = value.strip()
        words = value.split()
        if not words or words[0] == "LOCAL":
            return []
        if words[0] == "LIST":
            following = [name.strip() for name in lines[at + 1:]]
            # A NRRD's LIST runs to the end of its header file; a MetaImage's likewise.
            return [name for name in following if name]
        return [value, words[0]]
    return []


def check_data_files(path: str) -> None:
    """Refuse a header that names a data file outside its own folder (an absolute path,
    or one that climbs out with .. or a symbolic link): its bytes would become the
    image, whatever file they are. Raises InputError naming the header and the file."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    for name in _named_data_files(path):
        pattern_folder = os.path.dirname(name) if "%" in name else name
        target = os.path.realpath(os.path.join(folder, pattern_folder or "."))
        if target != folder and not target.startswith(folder + os.sep):
            raise InputError(f"{path}: names the data file {name[:200]!r} outside the "
                             f"header's folder {folder}; move the data next to the header")


@dataclass(frozen=True)
class ItkHeader:
    """What ITK's ImageIO reads from a header: geometry, voxel type, and whether boxes
    can be read without reading the whole file."""

    grid: Grid
    dtype: np.dtype
    can_stream: bool


def read_header(path: str) -> ItkHeader:
    """Geometry and voxel type from ITK's ImageIO, without reading voxels."""
    import itk

    check_data_files(path)  # before ITK opens any file the header names
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
    require_3d(path, sizes, int(io.GetNumberOfComponents()))
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
    return ItkHeader(grid, np.dtype(_ITK_COMPONENT_DTYPES[component]), can_stream)


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


def read_type(path: str, header: ItkHeader) -> tuple[object, np.dtype]:
    """The wrapped ITK pixel type to read the image's voxels through, and its NumPy
    dtype; InputError for 64-bit integer voxels, which ITK's Python wrapping cannot read."""
    found = _itk_read_type(header.dtype)
    if found is None:
        raise InputError(f"{path}: 64-bit integer voxels are not supported")
    return found


def open_with_itk(path: str, header: ItkHeader, pixel: tuple[object, np.dtype]) -> Source:
    """A source read by ITK: streaming when the file can be read in parts, else the whole
    image read now. `pixel` is what `read_type` returned."""
    pixel_type, read_dtype = pixel
    if header.can_stream:
        array = _ItkStreamingArray(path, pixel_type)
        # The reader's buffer, the extract filter's output and its copy, then the cast.
        per_voxel = 3 * read_dtype.itemsize + header.dtype.itemsize
        return Source(path, header.grid, header.dtype, "itk-streaming", array,
                      read_bytes_per_voxel=per_voxel)
    whole = _read_whole_with_itk(path, pixel_type)
    return Source(path, header.grid, header.dtype, "itk-whole", whole)
