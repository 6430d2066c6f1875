"""`dreg export` (issue 22 item 1): OUT's field, inverse and initial affine as files that
ITK, ANTs and Learn2Reg's evaluation read, checked by warping with those tools and
comparing with dreg's own warp (called in-process).

The OUT is made cheaply: a small synthetic pair on an anisotropic grid with a
non-identity direction, its exact field sampled onto a field grid at factor 2 (as a
registration's field is), and a result.json; no registration, no flow, no server.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from dreg.apply import export, invert
from dreg.apply.plan import inverse_chunks, plan_invert
from dreg.apply.warp import source_indices, warp_region
from dreg.errors import InputError
from dreg.field import create_field, open_field, sample_field
from dreg.grid import Grid, vectors_to_components, whole_region
from dreg.io import completion, ome_zarr, storage
from dreg.registration.records import InitialRecord, RegistrationResult

# A rotation about an oblique axis: no axis of the grid is along a world axis.
_ANGLE = 0.5
_AXIS = np.array([1.0, 2.0, 2.0]) / 3.0
_K = np.array([[0, -_AXIS[2], _AXIS[1]], [_AXIS[2], 0, -_AXIS[0]], [-_AXIS[1], _AXIS[0], 0]])
DIRECTION = np.eye(3) + math.sin(_ANGLE) * _K + (1 - math.cos(_ANGLE)) * _K @ _K
PAIR = {"grid": Grid((20, 22, 24), (1.0, 1.3, 0.8), origin_xyz=(3.0, -2.0, 5.0),
                     direction=DIRECTION.tolist()),
        "seed": 7, "amplitude_voxels": 1.5, "shift_voxels": (1.0, -1.0, 1.5), "chunks": 16}
# An initial affine (a small rotation and a shift): the field still holds the whole
# transform, as a registration's field does.
AFFINE = InitialRecord(matrix=[[0.998, -0.05, 0.0], [0.05, 0.998, 0.0], [0.0, 0.0, 1.0]],
                       translation=[0.7, -0.4, 0.3])
MARGIN = 1.0  # source voxels from the moving image's border: both tools interpolate there
# Of the moving image's intensity range. Both interpolate the same float32 field the same
# way (trilinear); measured: below 1e-7 for every tool and format.
TOLERANCE = 1e-5


def make_out(pair: dict, out: str, initial: InitialRecord | None = None) -> str:
    """OUT with the pair's exact field sampled on a grid at factor 2 over the fixed image
    (its voxels are fixed voxels 0, 2, 4, ..., so the values are exact), and result.json."""
    truth = open_field(pair["truth"])
    fixed_grid = truth.levels[0].grid
    grid = fixed_grid.coarsened(2)
    field_uri = storage.join(out, "field.ome.zarr")
    field = create_field(field_uri, grid, fixed=truth.attributes["fixed"],
                         moving_uri=pair["moving"], chunks=8)
    points = grid.region_points(whole_region(grid.shape_zyx))
    ome_zarr.write_region(field, 0, whole_region(grid.shape_zyx),
                          vectors_to_components(sample_field(truth, points)))
    identity = InitialRecord(matrix=np.eye(3).tolist(), translation=[0.0] * 3)
    result = RegistrationResult(
        output=out, field=field_uri, result=storage.join(out, "result.json"),
        fixed=pair["fixed"], moving=pair["moving"], flow_run_id="made-by-the-test",
        initial=initial or identity, stages=[], seconds=0.0)
    storage.write_text(result.result, result.document())
    return out


def make_inverse(out: str) -> None:
    """OUT/inverse.ome.zarr as `dreg invert` leaves it, computed in-process."""
    plan = plan_invert(out)

    def create(attributes: dict) -> None:
        image = invert.create_inverse(plan.dest, ome_zarr.open_image(plan.field),
                                      plan.moving_grid, plan.moving, overwrite=True)
        ome_zarr.update_attributes(image.uri, attributes)

    completion.start(plan.dest, plan.identity, create)
    for region in inverse_chunks(plan):
        invert.invert_chunk(plan.field, plan.dest, region)
    completion.mark_complete(plan.dest, plan.identity, {"summary": {}})


@pytest.fixture(scope="module")
def out(pair, tmp_path_factory) -> str:
    return make_out(pair, str(tmp_path_factory.mktemp("export") / "out"))


@pytest.fixture(scope="module")
def out_affine(pair, tmp_path_factory) -> str:
    return make_out(pair, str(tmp_path_factory.mktemp("export") / "out"), AFFINE)


@pytest.fixture(scope="module")
def reference(pair, out) -> dict:
    """dreg's own warp of the moving image onto the fixed grid, and where to compare: fixed
    voxels whose source lies MARGIN voxels inside the moving image (at the border ITK's
    interpolator and dreg's disagree on what is inside)."""
    field = open_field(storage.join(out, "field.ome.zarr"))
    moving = ome_zarr.open_image(pair["moving"])
    fixed_grid = Grid.from_dict(field.attributes["fixed"])
    region = whole_region(fixed_grid.shape_zyx)
    warped = warp_region(field, moving, 0, fixed_grid, region, "linear")
    index = source_indices(field, moving.levels[0].grid, fixed_grid, region)
    last = np.asarray(moving.levels[0].grid.shape_zyx) - 1
    inside = np.all((index >= MARGIN) & (index <= last - MARGIN), axis=-1)
    array = ome_zarr.read_region(moving, 0, whole_region(moving.levels[0].grid.shape_zyx))
    return {"warped": warped, "inside": inside, "fixed_grid": fixed_grid,
            "moving_grid": moving.levels[0].grid, "moving": array,
            "scale": float(array.max() - array.min())}


def itk_image(array: np.ndarray, grid: Grid):
    import itk

    image = itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing(list(grid.spacing_xyz))
    image.SetOrigin(list(grid.origin_xyz))
    image.SetDirection(itk.matrix_from_array(grid.direction_matrix))
    return image


def itk_warp(reference: dict, transform) -> np.ndarray:
    """The moving image resampled onto the fixed grid through an ITK transform, linear."""
    import itk

    moving = itk_image(reference["moving"], reference["moving_grid"])
    fixed = itk_image(np.zeros(reference["fixed_grid"].shape_zyx), reference["fixed_grid"])
    image_type = type(moving)
    resample = itk.ResampleImageFilter[image_type, image_type].New()
    resample.SetInput(moving)
    resample.SetTransform(transform)
    resample.SetInterpolator(itk.LinearInterpolateImageFunction[image_type, itk.D].New())
    resample.SetUseReferenceImage(True)
    resample.SetReferenceImage(fixed)
    resample.SetDefaultPixelValue(0.0)
    resample.Update()
    return itk.array_from_image(resample.GetOutput())


def field_transform(path: str) -> tuple:
    """A DisplacementFieldTransform (double, as ITK's resampling wants it) from an
    exported displacement-field image, and the array it views."""
    import itk

    image = itk.imread(path)  # Vector[F, 3] pixels; this ITK reads no double vectors
    vectors = itk.array_from_image(image).astype(np.float64)
    # A view (this ITK cannot copy double vector images): `vectors` must stay alive.
    field = itk.PyBuffer[itk.Image[itk.Vector[itk.D, 3], 3]].GetImageViewFromArray(
        vectors, is_vector=True)
    field.CopyInformation(image)
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(field)
    return transform, vectors


def assert_same_warp(reference: dict, warped: np.ndarray) -> float:
    inside = reference["inside"]
    assert inside.mean() > 0.5  # most of the fixed image is compared
    error = np.abs(warped[inside] - reference["warped"][inside]).max() / reference["scale"]
    assert error < TOLERANCE, error
    return error


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_an_exported_field_image_warps_in_itk_as_dreg_warps(out, reference, tmp_path,
                                                             suffix):
    """issue 22 item 1: ITK's ResampleImageFilter with a DisplacementFieldTransform built
    from the exported .nii.gz / .nrrd / .mha reproduces dreg's warp, so does ANTs'
    apply_transforms given the file as a displacement field, and the file keeps the
    field's grid (anisotropic spacing, oblique direction)."""
    import itk

    dest = str(tmp_path / f"field{suffix}")
    done = export.export(out, dest)
    assert done.output == dest and done.what == "field"
    image = itk.imread(dest)
    grid = open_field(storage.join(out, "field.ome.zarr")).levels[0].grid
    assert np.allclose(image.GetSpacing(), grid.spacing_xyz)
    assert np.allclose(image.GetOrigin(), grid.origin_xyz, atol=1e-5)
    assert np.allclose(itk.array_from_matrix(image.GetDirection()), grid.direction_matrix,
                       atol=1e-5)
    transform, _vectors = field_transform(dest)
    assert_same_warp(reference, itk_warp(reference, transform))
    assert_same_warp(reference, ants_warp(reference, dest))
    assert not list(tmp_path.glob(".*partial*"))  # the temporary name is gone


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_the_nifti_field_carries_the_displacement_intent_for_nibabel(out, tmp_path, suffix):
    """issue 22 item 1: the NIfTI header's intent code is NIFTI_INTENT_DISPVECT (1006),
    with the vector on the fifth axis, and its vectors are in NIfTI's RAS convention:
    x and y negated from ITK's (LPS) world vectors, z as it is."""
    import nibabel

    dest = str(tmp_path / f"field{suffix}")
    export.export(out, dest)
    image = nibabel.load(dest)
    assert int(image.header["intent_code"]) == 1006
    grid = open_field(storage.join(out, "field.ome.zarr")).levels[0].grid
    assert image.shape == (*grid.shape_zyx[::-1], 1, 3)
    ras = np.asarray(image.dataobj)[:, :, :, 0, :]  # (x, y, z, 3)
    lps = export.read_vectors(open_field(storage.join(out, "field.ome.zarr")))
    assert np.allclose(ras, np.transpose(lps, (2, 1, 0, 3)) * [-1, -1, 1])


@pytest.mark.parametrize("suffix", [".h5", ".tfm"])
def test_a_transform_file_reads_back_in_itk_and_warps_in_ants_as_dreg_warps(
        out, reference, tmp_path, suffix):
    """issue 22 item 1: the .h5 (and .tfm: ITK's text format holds a displacement field
    too) DisplacementFieldTransform is read back by itk.transformread, and ITK's
    resampling and ANTs' apply_transforms (antsApplyTransforms inside) through it
    reproduce dreg's warp."""
    import itk

    dest = str(tmp_path / f"field{suffix}")
    assert export.export(out, dest).with_affine is False
    transforms = itk.transformread(dest)
    assert [type(t).__name__ for t in transforms] == ["itkDisplacementFieldTransformD3"]
    assert_same_warp(reference, itk_warp(reference, transforms[0]))
    assert_same_warp(reference, ants_warp(reference, dest))


def ants_warp(reference: dict, transform_file: str) -> np.ndarray:
    import ants

    def image(array: np.ndarray, grid: Grid):
        # ANTs arrays are indexed (i, j, k): NumPy's (z, y, x) reversed.
        return ants.from_numpy(np.ascontiguousarray(array.T, dtype=np.float32),
                               origin=list(grid.origin_xyz), spacing=list(grid.spacing_xyz),
                               direction=grid.direction_matrix)

    fixed = image(np.zeros(reference["fixed_grid"].shape_zyx), reference["fixed_grid"])
    moving = image(reference["moving"], reference["moving_grid"])
    warped = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[transform_file],
                                   interpolator="linear", defaultvalue=0)
    return warped.numpy().T


def test_with_an_initial_affine_the_h5_is_the_affine_after_a_field(pair, out_affine,
                                                                   reference, tmp_path):
    """issue 22 item 1: where OUT has an initial affine, the .h5 holds a composite (the
    field, then the affine) that maps as OUT's field does, in ITK and in ANTs; --what
    affine writes the affine alone (.tfm, .mat, .h5)."""
    import itk

    dest = str(tmp_path / "composite.h5")
    assert export.export(out_affine, dest).with_affine is True
    [composite] = itk.transformread(dest)
    assert type(composite).__name__ == "itkCompositeTransformD3"
    assert composite.GetNumberOfTransforms() == 2
    assert [composite.GetNthTransform(i).GetNameOfClass() for i in range(2)] == [
        "AffineTransform", "DisplacementFieldTransform"]
    assert_same_warp(reference, itk_warp(reference, composite))
    assert_same_warp(reference, ants_warp(reference, dest))
    for suffix in (".tfm", ".mat", ".h5"):
        affine_file = str(tmp_path / f"affine{suffix}")
        export.export(out_affine, affine_file, "affine")
        [affine] = itk.transformread(affine_file)
        point = np.array([1.0, -2.0, 3.0])
        expected = np.asarray(AFFINE.matrix) @ point + AFFINE.translation
        assert np.allclose(affine.TransformPoint(point.tolist()), expected)


def test_an_exported_inverse_lies_on_the_moving_grid_and_maps_moving_to_fixed(
        pair, out, tmp_path):
    """issue 22 item 1: --what inverse exports OUT/inverse.ome.zarr on its grid over the
    moving image (not the fixed grid), with its values: moving points go to fixed points."""
    import itk

    with pytest.raises(InputError, match="dreg invert"):
        export.export(out, str(tmp_path / "early.nrrd"), "inverse")
    make_inverse(out)
    inverse = open_field(storage.join(out, "inverse.ome.zarr"), "moving_to_fixed")
    grid = inverse.levels[0].grid
    moving_grid = ome_zarr.open_image(pair["moving"]).levels[0].grid
    assert grid == moving_grid.coarsened(2)
    for suffix in (".mha", ".h5"):
        dest = str(tmp_path / f"inverse{suffix}")
        done = export.export(out, dest, "inverse")
        assert done.shape_xyz == list(grid.shape_zyx[::-1])
    image = itk.imread(str(tmp_path / "inverse.mha"))
    assert np.allclose(image.GetOrigin(), grid.origin_xyz, atol=1e-5)
    assert np.allclose(image.GetSpacing(), grid.spacing_xyz)
    assert np.allclose(itk.array_from_matrix(image.GetDirection()), grid.direction_matrix,
                       atol=1e-5)
    stored = export.read_vectors(inverse)
    written = itk.array_from_image(image)
    assert np.array_equal(np.isnan(written), np.isnan(stored))
    assert np.allclose(written[~np.isnan(stored)], stored[~np.isnan(stored)])
    # The inverse transform sends a moving point y to a fixed point x with x + u(x) = y.
    [transform] = itk.transformread(str(tmp_path / "inverse.h5"))
    y = grid.index_to_world(np.array([4.0, 5.0, 6.0]))
    x = np.asarray(transform.TransformPoint(y.tolist()))
    u = sample_field(open_field(storage.join(out, "field.ome.zarr")), x)
    assert np.allclose(x + u, y, atol=1e-2)


def test_learn2reg_npz_warps_as_their_evaluation_does(pair, out, reference, tmp_path):
    """issue 22 item 1: the .npz follows Learn2Reg's evaluation script (MDL-UzL/L2R,
    evaluation/L2RTest/evaluation.py): `arr_0` of shape (X, Y, Z, 3) on the fixed grid,
    voxel displacements; their map_coordinates warp of the moving array reproduces dreg's
    warp."""
    dest = str(tmp_path / "disp_0001_0001.npz")
    export.export(out, dest)
    disp = np.load(dest)["arr_0"]
    fixed_grid = reference["fixed_grid"]
    assert disp.shape == (*fixed_grid.shape_zyx[::-1], 3)
    moving = np.transpose(reference["moving"])  # the NIfTI array order (i, j, k)
    identity = np.meshgrid(*[np.arange(n) for n in moving.shape], indexing="ij")
    warped = ndimage.map_coordinates(moving, identity + disp.transpose(3, 0, 1, 2), order=1)
    assert_same_warp(reference, np.transpose(warped))


def test_export_refuses_bad_input_and_writes_nothing(pair, out, out_affine, tmp_path,
                                                      monkeypatch):
    """issue 22 item 1: bad input is one InputError naming it, and nothing is written."""
    def refused(match: str, *args, **kwargs):
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(InputError, match=match):
            export.export(*args, **kwargs)
        assert sorted(p.name for p in tmp_path.iterdir()) == before

    refused("no finished registration", str(tmp_path / "nothing"), str(tmp_path / "f.nrrd"))
    refused("unknown export format", out, str(tmp_path / "f.vtk"))
    refused("does not exist", out, str(tmp_path / "missing" / "f.nrrd"))
    refused("DEST must be a local file", out, "s3://bucket/f.nrrd")
    refused("no initial affine", out, str(tmp_path / "a.tfm"), "affine")
    refused("ITK transform file", out_affine, str(tmp_path / "a.nrrd"), "affine")
    refused(".mat holds an affine only", out, str(tmp_path / "f.mat"))
    refused("--what", out, str(tmp_path / "f.nrrd"), "warp")
    refused("fixed-to-moving displacement only", out, str(tmp_path / "f.npz"), "inverse")
    (tmp_path / "taken.nrrd").write_text("not ours")
    refused("already exists", out, str(tmp_path / "taken.nrrd"))
    assert (tmp_path / "taken.nrrd").read_text() == "not ours"
    monkeypatch.setenv(export.MAX_VOXELS_VARIABLE, "100")
    refused("use the OME-Zarr field", out, str(tmp_path / "f.nii.gz"))
    monkeypatch.setenv(export.MAX_VOXELS_VARIABLE, "many")
    refused(export.MAX_VOXELS_VARIABLE, out, str(tmp_path / "f.nii.gz"))
    monkeypatch.delenv(export.MAX_VOXELS_VARIABLE)
    # Learn2Reg's voxel displacements need one grid for fixed and moving.
    other = str(tmp_path / "other.ome.zarr")
    ome_zarr.create_image(other, [Grid((20, 22, 24), (1.0, 1.0, 1.0))], "float32", chunks=16)
    moved = make_out({**pair, "moving": other}, str(tmp_path / "out-other"))
    refused("Learn2Reg's convention is not defined", moved, str(tmp_path / "f.npz"))
    # --overwrite replaces a file, never a folder.
    export.export(out, str(tmp_path / "taken.nrrd"), overwrite=True)
    assert (tmp_path / "taken.nrrd").read_bytes()[:4] == b"NRRD"
    refused("is a folder", out, str(tmp_path / "out-other"), overwrite=True)


def test_the_export_command_prints_json_or_one_error_line(out, tmp_path, capsys):
    """issue 22 item 1: `dreg export` prints one JSON line; bad input one `dreg: error:`
    line, exit 2."""
    import json

    from cli.main import main

    assert main(["export", out, str(tmp_path / "f.mha")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "mha"
    assert main(["export", out, str(tmp_path / "f.mha")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("dreg: error: ")
    assert "already exists" in error[0]


def test_a_metaimage_is_written_slab_by_slab(out, tmp_path, monkeypatch):
    """issue 22 item 1: the .mha export streams (ITK's writer pastes one slab of z planes
    at a time into the file) and the file holds the whole field exactly."""
    import itk

    field = open_field(storage.join(out, "field.ome.zarr"))
    nz, ny, nx = field.levels[0].grid.shape_zyx
    monkeypatch.setattr(export, "SLAB_VOXELS", 3 * ny * nx)  # 3 planes of 8-plane chunks
    slabs = []
    monkeypatch.setattr(export, "stream_metaimage", lambda *args, real=export.stream_metaimage:
                        slabs.append(real(*args, slab_voxels=export.SLAB_VOXELS)))
    dest = str(tmp_path / "field.mha")
    export.export(out, dest)
    assert slabs == [math.ceil(nz / 3)] and slabs[0] > 1
    assert np.array_equal(itk.array_from_image(itk.imread(dest)), export.read_vectors(field))


def test_export_reads_an_out_on_s3(s3, pair, out, tmp_path):
    """issue 22 item 1: OUT on S3 (the moto server) exports to a local file, the same
    bytes of field as from a local OUT."""
    import uuid

    import itk

    remote = make_out(pair, s3.uri(uuid.uuid4().hex, "out"))
    dest = str(tmp_path / "field.nrrd")
    export.export(remote, dest)
    export.export(out, str(tmp_path / "local.nrrd"))
    assert np.array_equal(itk.array_from_image(itk.imread(dest)),
                          itk.array_from_image(itk.imread(str(tmp_path / "local.nrrd"))))
