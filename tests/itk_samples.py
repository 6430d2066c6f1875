"""Sample volumes written with ITK in every format `dreg convert` reads, with a
non-trivial geometry (anisotropic spacing, an offset origin, a rotated direction)."""

from __future__ import annotations

import itk
import numpy as np

SHAPE_ZYX = (40, 50, 150)  # three levels: longest axis 150, 75, then 38 <= 64
SPACING_XYZ = (0.5, 0.75, 1.25)
ORIGIN_XYZ = (10.25, -5.5, 3.125)
# A rotation by 30 degrees about z, then 20 about x: no axis stays put.
_C30, _S30, _C20, _S20 = np.cos(np.pi / 6), np.sin(np.pi / 6), np.cos(np.pi / 9), np.sin(np.pi / 9)
DIRECTION = np.array([[_C30, -_S30, 0], [_S30, _C30, 0], [0, 0, 1]]) @ np.array(
    [[1, 0, 0], [0, _C20, -_S20], [0, _S20, _C20]]
)


def sample_array(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, SHAPE_ZYX, endpoint=True).astype(dtype)
    return rng.normal(100, 30, SHAPE_ZYX).astype(dtype)


def write_with_itk(path, array, compression=False) -> None:
    image = itk.image_from_array(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    image.SetDirection(itk.matrix_from_array(DIRECTION))
    itk.imwrite(image, str(path), compression=compression)


# (file name, dtype, ITK compression, the reader convert must pick, direction tolerance)
ITK_CASES = [
    ("image.mha", "int16", False, "itk-streaming", 0),
    ("image.mhd", "uint8", False, "itk-streaming", 0),
    ("compressed.mha", "float32", True, "itk-whole", 0),
    ("image.nrrd", "uint16", False, "raw-nrrd", 1e-15),
    ("image.nhdr", "float64", False, "raw-nrrd", 1e-15),
    ("gzip.nrrd", "int16", True, "itk-whole", 1e-15),
    ("image.nii", "float32", False, "itk-streaming", 1e-7),  # NIfTI keeps a float32 quaternion
    ("image.nii.gz", "int16", False, "itk-streaming", 1e-7),
]
