"""What every reader gives convert: a `Source`, an opened image read one box at a time.

A reader is a module with `SUFFIXES` (the file extensions it reads, lower case) and
`open_source(path) -> Source`, which reads the header only (no voxels, except for the
files that cannot be read in parts) and raises InputError naming the file when it is
unreadable or not a scalar 3D image. `Reader` spells that protocol out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dreg.errors import InputError, first_line
from dreg.grid import Grid, Region


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


class Reader(Protocol):
    """One image format: the reader modules of this package each satisfy this."""

    SUFFIXES: tuple[str, ...]

    def open_source(self, path: str) -> Source:
        """Open `path` (a local file with one of SUFFIXES) for reading boxes."""
        ...


def require_3d(path: str, sizes_xyz: list[int], components: int) -> None:
    """Raise InputError unless the image is 3D with one component per voxel, and no
    larger than an OME-Zarr level may be (checked on the header, before any voxel is
    read: some formats are read whole)."""
    from dreg.io.ome_zarr.read import MAX_LEVEL_VOXELS

    if len(sizes_xyz) != 3:
        raise InputError(
            f"{path}: needs a 3D image; it has {len(sizes_xyz)} dimensions (sizes {sizes_xyz})"
        )
    if components != 1:
        raise InputError(
            f"{path}: needs a scalar image; it has {components} components per voxel"
        )
    voxels = int(np.prod([int(n) for n in sizes_xyz], dtype=object))
    if voxels > MAX_LEVEL_VOXELS:
        raise InputError(f"{path}: its header claims {voxels:.3g} voxels, more than dreg "
                         f"accepts ({MAX_LEVEL_VOXELS:.3g})")
