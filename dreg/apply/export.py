"""Export a finished registration's transform to files other tools read.

DEST's extension picks the format:
- ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``: an ITK displacement-field image written by
  ITK's image writers: vector pixels (x, y, z) in physical units, on the field's own grid
  (origin, spacing, direction). ``field`` is u (fixed → moving) on its grid over the fixed
  image; ``inverse`` is v (moving → fixed, OUT/inverse.ome.zarr) on its grid over the
  moving image, NaN where a moving point has no preimage. NIfTI files carry the intent
  code NIFTI_INTENT_DISPVECT (1006); their vectors are then stored in NIfTI's RAS
  convention (ITK converts from its LPS on writing and back on reading, as ANTs does).
- ``.h5``, ``.tfm``: an ITK transform file. ``field``: a DisplacementFieldTransform, after
  the initial affine where OUT has one (see `affine_residual`); ``inverse``: the inverse
  as a DisplacementFieldTransform; ``affine``: the initial affine alone (also ``.mat``,
  the format ANTs writes affines in).
- ``.npz``: Learn2Reg's convention (``arr_0``, shape (X, Y, Z, 3), displacement in voxels
  along the array axes, on the fixed image's full-resolution grid), only where it is
  defined: fixed and moving on one grid (`learn2reg_problem`).

A MetaImage (.mha) is written slab by slab of z planes through ITK's writer (its paste
region: only ITK's MetaImage writer takes one; the NIfTI and NRRD writers refuse it), so
its export holds one slab at a time. The other formats are built in memory (the ITK
writers and transform files need the whole image). A field larger than
DREG_EXPORT_MAX_VOXELS is refused with a line pointing to the OME-Zarr field: the tools
that read these files load the whole field too. Each file is written under a temporary
name in DEST's folder and renamed onto DEST when whole.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from dreg.errors import InputError
from dreg.field import FIXED_TO_MOVING, MOVING_TO_FIXED, AffineTransform, open_field
from dreg.grid import Grid
from dreg.io import ome_zarr, storage
from dreg.layout import INVERSE_NAME
from dreg.registration.records import RegistrationResult, load_result
from dreg.trust import bounded_setting

FIELD, INVERSE, AFFINE = "field", "inverse", "affine"
WHATS = (FIELD, INVERSE, AFFINE)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
TRANSFORM_SUFFIXES = (".h5", ".tfm", ".mat")
LEARN2REG_SUFFIX = ".npz"
SUFFIXES = (*IMAGE_SUFFIXES, *TRANSFORM_SUFFIXES, LEARN2REG_SUFFIX)
NIFTI_INTENT_DISPVECT = 1006
MAX_VOXELS_VARIABLE = "DREG_EXPORT_MAX_VOXELS"
# 2**26 voxels: a field of 400^3 (a fixed image of 800^3 at the usual factor 2) is 0.8 GB
# of float32 vectors in memory, and twice that as the doubles a transform file holds.
DEFAULT_MAX_VOXELS = 2**26
SLAB_VOXELS = 2**22  # voxels of one slab of a streamed MetaImage (48 MiB of vectors)


class ExportResult(BaseModel):
    """What `dreg export` wrote (its last JSON line)."""

    output: str
    what: str
    format: str
    source: str
    shape_xyz: list[int] | None = None
    voxels: int = 0
    with_affine: bool = False
    seconds: float


@dataclass(frozen=True)
class ExportPlan:
    """Everything an export needs, checked: where from, where to, in which format."""

    out: str
    dest: str
    what: str
    suffix: str
    result: RegistrationResult
    source: str  # the OME-Zarr field exported (the result.json for the affine)
    grid: Grid | None  # the grid of the exported array (None for the affine)
    affine: AffineTransform | None  # the initial affine, where OUT has one


def max_voxels() -> int:
    """The largest field (voxels of the exported grid) exported to a single file."""
    return bounded_setting(MAX_VOXELS_VARIABLE, int, 1, math.inf,
                           "a whole number of voxels, at least 1", DEFAULT_MAX_VOXELS)


def suffix_of(dest: str) -> str:
    """DEST's format, by its extension; InputError naming the ones known."""
    name = Path(dest).name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise InputError(f"{dest}: unknown export format (the extension must be one of "
                     f"{', '.join(SUFFIXES)})")


def initial_affine(result: RegistrationResult) -> AffineTransform | None:
    """The registration's initial affine, or None where it started from the identity."""
    affine = AffineTransform(matrix=tuple(tuple(r) for r in result.initial.matrix),
                             translation=tuple(result.initial.translation))
    identity = AffineTransform.identity()
    if np.allclose(affine.matrix, identity.matrix, rtol=0, atol=1e-12) and np.allclose(
            affine.translation, 0, rtol=0, atol=1e-12):
        return None
    return affine


def plan_export(out: str, dest: str, what: str = FIELD, overwrite: bool = False) -> ExportPlan:
    """Check an export before anything is written; InputError naming the input otherwise."""
    if what not in WHATS:
        raise InputError(f"--what {what!r}: choose one of {', '.join(WHATS)}")
    dest = _check_dest(dest, overwrite)
    suffix = suffix_of(dest)
    result = load_result(out)
    affine = initial_affine(result)
    if what == AFFINE:
        if suffix not in TRANSFORM_SUFFIXES:
            raise InputError(f"{dest}: an affine is exported to an ITK transform file "
                             f"({', '.join(TRANSFORM_SUFFIXES)}), not {suffix}")
        if affine is None:
            raise InputError(f"{result.output}: the registration has no initial affine (it "
                             "started from the identity); its whole transform is the field")
        return ExportPlan(out=result.output, dest=dest, what=what, suffix=suffix,
                          result=result, source=result.result, grid=None, affine=affine)
    if suffix == ".mat":
        raise InputError(f"{dest}: .mat holds an affine only (--what affine); export the "
                         f"{what} to .h5 or .tfm")
    if what == FIELD:
        source = open_field(result.field, FIXED_TO_MOVING)
    else:
        if suffix == LEARN2REG_SUFFIX:
            raise InputError(f"{dest}: Learn2Reg's convention holds the fixed-to-moving "
                             "displacement only; export the inverse to an image or .h5")
        source = _open_inverse(result)
    grid = source.levels[0].grid
    if suffix == LEARN2REG_SUFFIX:
        problem = learn2reg_problem(result)
        if problem:
            raise InputError(f"{dest}: Learn2Reg's convention is not defined for this "
                             f"registration: {problem}")
        grid = Grid.from_dict(source.attributes["fixed"])
    limit = max_voxels()
    voxels = math.prod(grid.shape_zyx)
    if voxels > limit:
        raise InputError(f"{source.uri}: {voxels} voxels is more than a single-file export "
                         f"takes ({limit}, {MAX_VOXELS_VARIABLE}); use the OME-Zarr field "
                         "itself")
    return ExportPlan(out=result.output, dest=dest, what=what, suffix=suffix, result=result,
                      source=source.uri, grid=grid,
                      affine=affine if what == FIELD and suffix in TRANSFORM_SUFFIXES
                      else None)


def _check_dest(dest: str, overwrite: bool) -> str:
    if storage.is_s3(str(dest)):
        raise InputError(f"{dest}: DEST must be a local file (ITK writes local files); "
                         "copy it to S3 afterwards")
    dest = storage.normalize_uri(dest)
    path = Path(dest)
    if not path.parent.is_dir():
        raise InputError(f"{dest}: its folder {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"{dest}: is a folder; DEST must be a file name")
    if path.exists() and not overwrite:
        raise InputError(f"{dest}: already exists (pass --overwrite to replace it)")
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{dest}: its folder {path.parent} is not writable")
    return dest


def _open_inverse(result: RegistrationResult) -> ome_zarr.OmeZarrImage:
    """OUT's inverse, when it is the complete inverse of OUT's current field."""
    from dreg.apply.plan import inverse_is_current

    if not inverse_is_current(result.output):
        raise InputError(f"{result.output}: no complete inverse of the current field yet "
                         f"(run `dreg invert {result.output}` first)")
    return open_field(storage.join(result.output, INVERSE_NAME), MOVING_TO_FIXED)


def learn2reg_problem(result: RegistrationResult) -> str:
    """Why Learn2Reg's convention does not fit this registration ('' when it does).

    Learn2Reg's evaluation warps the moving array with
    ``map_coordinates(moving, identity + disp)`` on the fixed array's index grid, and adds
    the displacement to fixed landmarks in the moving image's frame: a displacement in
    voxels means one thing only when fixed and moving share one grid (shape, spacing,
    origin and direction). Any direction is allowed then: the convention lives in index
    space, which both images share."""
    fixed = ome_zarr.open_image(result.fixed).levels[0].grid
    moving = ome_zarr.open_image(result.moving).levels[0].grid
    for name in ("shape_zyx", "spacing_xyz", "origin_xyz", "direction"):
        a, b = np.asarray(getattr(fixed, name), float), np.asarray(getattr(moving, name), float)
        if not np.allclose(a, b, rtol=1e-6, atol=1e-6):
            return (f"fixed and moving differ in {name.split('_')[0]} ({a.tolist()} against "
                    f"{b.tolist()}); voxel displacements need one grid for both")
    return ""


# ----------------------------------------------------------------------------- arrays


def read_vectors(field: ome_zarr.OmeZarrImage, planes: tuple[int, int] | None = None
                 ) -> np.ndarray:
    """A field's level 0 (or its z planes from `planes` start to stop) as world vectors,
    shape (z, y, x, 3) with components (x, y, z), float32: ITK's layout of a vector image.
    Read chunk by chunk into one array, so the field is held once."""
    level = field.levels[0]
    nz, ny, nx = level.grid.shape_zyx
    start, stop = planes or (0, nz)
    vectors = np.empty((stop - start, ny, nx, 3), dtype=np.float32)
    for region in ome_zarr.chunk_regions((nz, ny, nx), level.chunks_zyx):
        z = slice(max(region[0].start, start), min(region[0].stop, stop))
        if z.start >= z.stop:
            continue
        components = ome_zarr.read_region(field, 0, (z, *region[1:]))  # (3, z, y, x)
        local = (slice(z.start - start, z.stop - start), *region[1:])
        vectors[local] = np.moveaxis(components[::-1], 0, -1)
    return vectors


def affine_residual(vectors: np.ndarray, grid: Grid, affine: AffineTransform) -> np.ndarray:
    """The displacement d that the initial affine A follows: A(x + d(x)) = x + u(x), so
    d(x) = A⁻¹(x + u(x)) − x, in place of `vectors` (u, (z, y, x, 3)).

    OUT's field u is the whole transform (each stage composes onto the initial affine), so
    a transform file that puts A after a displacement field must hold d, not u, or it
    would apply A twice. d is an affine function of u at each voxel, so trilinear
    interpolation of d between voxels is exactly A⁻¹ of the interpolated u: the composite
    maps every point as u does."""
    inverse = np.linalg.inv(np.asarray(affine.matrix, dtype=float))
    translation = np.asarray(affine.translation, dtype=float)
    for k in range(grid.shape_zyx[0]):  # one plane at a time: a few copies of a plane
        region = (slice(k, k + 1), slice(0, grid.shape_zyx[1]), slice(0, grid.shape_zyx[2]))
        points = grid.region_points(region)
        moved = points + vectors[k:k + 1]
        vectors[k:k + 1] = (moved - translation) @ inverse.T - points
    return vectors


def learn2reg_array(field: ome_zarr.OmeZarrImage, fixed_grid: Grid) -> np.ndarray:
    """u at every voxel of the fixed image's full-resolution grid, as Learn2Reg reads it:
    shape (X, Y, Z, 3) (the NIfTI array's i, j, k order), components the displacement in
    voxels along i, j, k. u is sampled trilinearly, as `dreg warp` samples it."""
    from dreg.field import sample_field

    nz, ny, nx = fixed_grid.shape_zyx
    out = np.empty((nx, ny, nz, 3), dtype=np.float32)
    world_to_step = np.linalg.inv(fixed_grid.index_to_world_matrix)
    for k in range(nz):
        region = (slice(k, k + 1), slice(0, ny), slice(0, nx))
        points = fixed_grid.region_points(region)[0]  # (y, x, 3)
        steps = sample_field(field, points) @ world_to_step.T  # (y, x, 3) in i, j, k
        out[:, :, k, :] = np.transpose(steps, (1, 0, 2))
    return out


# ----------------------------------------------------------------------------- ITK


def _itk_image(vectors: np.ndarray, grid: Grid, pixel):
    """An ITK image of Vector[pixel, 3] viewing `vectors` (z, y, x, 3) with the grid's
    geometry. `vectors` must outlive the image (it is a view)."""
    import itk

    image_type = itk.Image[itk.Vector[pixel, 3], 3]
    image = itk.PyBuffer[image_type].GetImageViewFromArray(vectors, is_vector=True)
    image.SetSpacing([float(s) for s in grid.spacing_xyz])
    image.SetOrigin([float(o) for o in grid.origin_xyz])
    image.SetDirection(itk.matrix_from_array(np.asarray(grid.direction_matrix, dtype=float)))
    return image


def write_image(vectors: np.ndarray, grid: Grid, path: str, suffix: str) -> None:
    """A displacement-field image through ITK's writers; NIfTI with intent 1006."""
    import itk

    image = _itk_image(vectors, grid, itk.F)
    if suffix in (".nii.gz", ".nii"):
        # ITK's NIfTI writer sets NIFTI_INTENT_DISPVECT from this entry, and then writes
        # the vectors in NIfTI's RAS convention (it flips x and y from ITK's LPS), which
        # ITK and ANTs flip back on reading: a plain vector (intent 1007) would not.
        image.GetMetaDataDictionary()["intent_code"] = str(NIFTI_INTENT_DISPVECT)
    # NRRD and MetaImage raw: float displacements barely compress (as in the zarr field).
    itk.imwrite(image, path, compression=suffix == ".nii.gz")


def slab_planes(field: ome_zarr.OmeZarrImage, slab_voxels: int) -> int:
    """z planes per slab of a streamed export: whole chunks along z where they fit in
    `slab_voxels`, so that each chunk is decoded once; else as many planes as fit (one at
    least)."""
    level = field.levels[0]
    nz, ny, nx = level.grid.shape_zyx
    fitting = max(1, slab_voxels // (ny * nx))
    depth = level.chunks_zyx[0]
    return min(nz, fitting // depth * depth if fitting >= depth else fitting)


def stream_metaimage(field: ome_zarr.OmeZarrImage, path: str,
                     slab_voxels: int = SLAB_VOXELS) -> int:
    """Write a field as a MetaImage of (x, y, z) vectors, slab of z planes by slab, through
    ITK's writer with a paste region: the first slab creates the file with the whole
    grid's header, the others are written into it. Returns the number of slabs."""
    import itk

    grid = field.levels[0].grid
    nz, ny, nx = grid.shape_zyx
    image_type = itk.Image[itk.Vector[itk.F, 3], 3]
    largest = itk.ImageRegion[3]([0, 0, 0], [nx, ny, nz])
    planes = slab_planes(field, slab_voxels)
    slabs = 0
    for start in range(0, nz, planes):
        stop = min(nz, start + planes)
        vectors = np.ascontiguousarray(read_vectors(field, (start, stop)))
        slab = _itk_image(vectors, grid, itk.F)
        # The slab sits at its place in the whole grid (the whole image's geometry, index
        # from `start`); a view's largest region is its buffer until set again.
        region = itk.ImageRegion[3]([0, 0, start], [nx, ny, stop - start])
        slab.SetRegions(region)
        slab.SetLargestPossibleRegion(largest)
        paste = itk.ImageIORegion(3)
        paste.SetIndex([0, 0, start])
        paste.SetSize([nx, ny, stop - start])
        writer = itk.ImageFileWriter[image_type].New()
        writer.SetFileName(path)
        writer.SetInput(slab)
        writer.SetIORegion(paste)
        writer.Update()
        slabs += 1
    return slabs


def _affine_transform(affine: AffineTransform):
    import itk

    transform = itk.AffineTransform[itk.D, 3].New()
    transform.SetMatrix(itk.matrix_from_array(np.asarray(affine.matrix, dtype=float)))
    transform.SetTranslation([float(t) for t in affine.translation])
    return transform


def write_transform(path: str, vectors: np.ndarray | None, grid: Grid | None,
                    affine: AffineTransform | None) -> None:
    """An ITK transform file: the affine alone, a DisplacementFieldTransform, or a
    composite that applies the field first, then the affine (ITK's CompositeTransform
    applies the last-added transform first)."""
    import itk

    transforms = []
    if affine is not None:
        transforms.append(_affine_transform(affine))
    if vectors is not None:
        field = _itk_image(vectors.astype(np.float64, copy=False), grid, itk.D)
        transform = itk.DisplacementFieldTransform[itk.D, 3].New()
        transform.SetDisplacementField(field)
        transforms.append(transform)
    if len(transforms) == 1:
        itk.transformwrite(transforms, path, compression=True)
        return
    composite = itk.CompositeTransform[itk.D, 3].New()
    for transform in transforms:
        composite.AddTransform(transform)
    itk.transformwrite([composite], path, compression=True)


# ----------------------------------------------------------------------------- the verb


def export(out: str, dest: str, what: str = FIELD, overwrite: bool = False) -> ExportResult:
    """Export OUT's field, inverse or initial affine to DEST (format by extension)."""
    started = time.perf_counter()
    plan = plan_export(out, dest, what, overwrite)
    temporary = _temporary_name(plan.dest, plan.suffix)
    try:
        _write(plan, temporary)
        os.replace(temporary, plan.dest)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    grid = plan.grid
    return ExportResult(
        output=plan.dest, what=plan.what, format=plan.suffix.lstrip("."),
        source=plan.source,
        shape_xyz=list(grid.shape_zyx[::-1]) if grid else None,
        voxels=math.prod(grid.shape_zyx) if grid else 0,
        with_affine=plan.affine is not None and plan.what == FIELD,
        seconds=round(time.perf_counter() - started, 3))


def _temporary_name(dest: str, suffix: str) -> str:
    """A name beside DEST that ends in DEST's extension (ITK picks its writer by it) and
    that no finished export has."""
    path = Path(dest)
    return str(path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}"))


def _write(plan: ExportPlan, path: str) -> None:
    if plan.what == AFFINE:
        write_transform(path, None, None, plan.affine)
        return
    field = open_field(plan.source, FIXED_TO_MOVING if plan.what == FIELD else MOVING_TO_FIXED)
    if plan.suffix == LEARN2REG_SUFFIX:
        with open(path, "wb") as file:
            np.savez_compressed(file, arr_0=learn2reg_array(field, plan.grid))
        return
    if plan.suffix == ".mha":
        stream_metaimage(field, path)
        return
    vectors = read_vectors(field)
    if plan.suffix in IMAGE_SUFFIXES:
        write_image(vectors, plan.grid, path, plan.suffix)
        return
    # A transform file holds doubles: convert once, and take d from u in double.
    vectors = vectors.astype(np.float64)
    if plan.affine is not None:
        vectors = affine_residual(vectors, plan.grid, plan.affine)
    write_transform(path, vectors, plan.grid, plan.affine)
