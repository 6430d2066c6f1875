"""itk-dreg driver for the peer benchmark.

bench/peer.py runs this file with a separate interpreter that has itk-dreg
(0.0.1) installed, to time itk-dreg on the same fixed/moving pair and the same
elastix parameter maps that dreg is given. It is not imported by the project.

It registers FIXED to MOVING with itk-dreg's public API:
``itk_dreg.register.register_images`` with
``ElastixDRegBlockPairRegistrationMethod`` (all parameter maps in one elastix
run per block) and ``ReduceToDisplacementFieldMethod``, runs the resulting
dask graph on a local ``dask.distributed`` cluster, and writes the displacement
field of the reduced transform to OUT_FIELD.

The field follows ITK's convention: each vector is ``moving point - fixed
point`` in physical (x, y, z) order, sampled on a grid over the fixed image.

The last line of stdout is a JSON object with the timings and a summary.

itk-dreg 0.0.1 needs small workarounds with numpy 2 / itk-elastix 0.25, all
in this file (itk-dreg itself is not changed): parameter-map values are passed
as tuples and the ITK transform types in reverse map order
(load_parameter_maps), the identity initial transform is passed as None (see
main), and ``_BlockMethod`` aliases ``np.product`` and drops an unpicklable
field from each block result.

Usage::

    python bench/_itk_dreg_run.py FIXED MOVING PARAMS_JSON OUT_FIELD \\
        [--block 64] [--overlap 0.25] [--factor 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import itk
import numpy as np
from distributed import Client, LocalCluster
from itk_dreg.base.image_block_interface import BlockRegStatus
from itk_dreg.base.registration_interface import ConstructReaderMethod
from itk_dreg.elastix.register import ElastixDRegBlockPairRegistrationMethod
from itk_dreg.elastix.serialize import (
    list_to_parameter_object,
    parameter_object_to_list,
)
from itk_dreg.itk import make_reader
from itk_dreg.reduce_dfield.dreg import ReduceToDisplacementFieldMethod
from itk_dreg.register import register_images

DIM = 3
FIELD_TYPE = itk.Image[itk.Vector[itk.D, DIM], DIM]

# elastix "Transform" name -> ITK transform type that
# ElastixRegistrationMethod.ConvertToItkTransform produces for it.
TRANSFORM_TYPES = {
    "TranslationTransform": itk.TranslationTransform[itk.D, DIM],
    "EulerTransform": itk.Euler3DTransform[itk.D],
    "SimilarityTransform": itk.Similarity3DTransform[itk.D],
    "AffineTransform": itk.AffineTransform[itk.D, DIM],
    "BSplineTransform": itk.BSplineTransform[itk.D, DIM, 3],
    "RecursiveBSplineTransform": itk.BSplineTransform[itk.D, DIM, 3],
}


def log(msg: str) -> None:
    print(f"[itk-dreg-run] {msg}", file=sys.stderr, flush=True)


class _Reader(ConstructReaderMethod):
    """Streaming reader constructor: metadata only, voxels read per block."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def __call__(self, **kwargs):
        # itk_dreg.itk.make_reader calls UpdateOutputInformation() only.
        return make_reader(self.path)


class _BlockMethod(ElastixDRegBlockPairRegistrationMethod):
    """ElastixDRegBlockPairRegistrationMethod plus two compatibility fixes.

    1. itk-dreg 0.0.1 validates results with ``np.product``, which numpy 2
       removed; without an alias every block fails with AttributeError
       (caught by itk-dreg, reported as FAILURE) and the reduce then raises
       "Failed to compose at least one transform".
    2. The result keeps the ``itk.ElastixRegistrationMethod`` it ran, a SWIG
       object that cannot be pickled, so a block result cannot move to the
       worker that runs the reduce when there is more than one worker. It is
       dropped here; nothing downstream uses it.
    """

    def __call__(self, **kwargs):
        if not hasattr(np, "product"):
            np.product = np.prod
        result = super().__call__(**kwargs)
        result.registration_method = None
        return result


def load_parameter_maps(path: str):
    """JSON list of {str: [str]} -> (serialised parameter object, ITK types)."""
    with open(path) as f:
        maps = json.load(f)
    if not isinstance(maps, list) or not maps:
        raise ValueError(f"{path}: expected a non-empty JSON list of parameter maps")
    # itk-dreg's dict_to_parameter_map compares the stored value (a tuple)
    # with the given one, so values must be tuples, not lists.
    parameter_object = list_to_parameter_object([
        {str(k): (v,) if isinstance(v, str) else tuple(str(x) for x in v)
         for k, v in m.items()}
        for m in maps
    ])
    serial = parameter_object_to_list(parameter_object)
    types = []
    for i, m in enumerate(serial):
        name = m.get("Transform", ("?",))[0]
        if name not in TRANSFORM_TYPES:
            raise ValueError(f"map {i}: unsupported Transform {name!r}")
        types.append(TRANSFORM_TYPES[name])
    # itk-dreg casts ElastixRegistrationMethod.GetNthTransform(i) to
    # itk_transform_types[i]; itk-elastix 0.25 numbers those transforms in
    # reverse map order (0 = last map), so the types go in reverse too. The
    # composite itk-dreg builds in that order equals elastix's own
    # combination transform (checked against transformix).
    return serial, types[::-1], [m["Transform"][0] for m in serial]


def displacement_field_of(transform):
    """The displacement field image of a (composite of) DisplacementFieldTransform."""
    dft_type = itk.DisplacementFieldTransform[itk.D, DIM]
    if isinstance(transform, dft_type):
        return transform.GetDisplacementField()
    if isinstance(transform, itk.CompositeTransform[itk.D, DIM]):
        for i in range(transform.GetNumberOfTransforms()):
            try:
                return dft_type.cast(transform.GetNthTransform(i)).GetDisplacementField()
            except (RuntimeError, TypeError):
                continue
    return None


def sample_transform(transform, fixed_path: str, factor: int):
    """Sample any transform as a displacement field on a coarsened fixed grid."""
    fixed = _Reader(fixed_path)().GetOutput()
    size = [math.ceil(s / factor) for s in itk.size(fixed)]
    spacing = [s * factor for s in itk.spacing(fixed)]
    f = itk.TransformToDisplacementFieldFilter[FIELD_TYPE, itk.D].New()
    f.SetTransform(transform)
    f.SetOutputOrigin(fixed.GetOrigin())
    f.SetOutputDirection(fixed.GetDirection())
    f.SetOutputSpacing(spacing)
    f.SetSize(size)
    f.Update()
    return f.GetOutput()


def writable(field):
    """Image[Vector[D,3],3] -> float32 3-component image on the same grid.

    ITK Python's wheels wrap no ImageFileWriter or ImageFileReader for
    Image[Vector[D,3],3] (the type of itk-dreg's field), and a float64
    3-component file does not open with a plain itk.imread; float32 does
    (as Image[Vector[F,3],3]).
    """
    arr = itk.array_from_image(field).astype(np.float32)
    out = itk.image_from_array(arr, is_vector=True)
    out.SetOrigin(field.GetOrigin())
    out.SetSpacing(field.GetSpacing())
    out.SetDirection(field.GetDirection())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("params_json")
    p.add_argument("out_field")
    p.add_argument("--block", type=int, default=64, help="fixed chunk edge (voxels)")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap factor per axis")
    p.add_argument("--factor", type=int, default=4, help="displacement grid scale factor")
    p.add_argument("--workers", type=int, default=2, help="dask worker processes")
    a = p.parse_args(argv)

    serial, transform_types, names = load_parameter_maps(a.params_json)
    log(f"parameter maps: {names}")
    fixed_ctor = _Reader(a.fixed)
    moving_ctor = _Reader(a.moving)
    log(f"fixed size {list(itk.size(fixed_ctor().GetOutput()))}, "
        f"moving size {list(itk.size(moving_ctor().GetOutput()))}")

    # Identity initial transform, given as None, which every itk-dreg code
    # path treats as "no transform". A real itk.Transform (even an identity
    # TranslationTransform) is handed to elastix via
    # SetExternalInitialTransform, and with a B-spline map itk-elastix 0.25
    # then fails in every block ("AdvancedTransformAdapter: Not implemented").
    initial = None

    # One thread per worker, as dreg's workers have (flows.cluster.THREAD_VARIABLES):
    # elastix ignores the maps' MaximumNumberOfThreads, and ITK would otherwise start
    # a thread per core in each worker. The spawned workers inherit the environment.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                     "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[variable] = "1"
    log(f"starting LocalCluster with {a.workers} worker process(es)")
    with LocalCluster(
        n_workers=a.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        log(f"cluster up: {client}")
        t0 = time.perf_counter()
        schedule = register_images(
            fixed_reader_ctor=fixed_ctor,
            moving_reader_ctor=moving_ctor,
            block_registration_method=_BlockMethod(),
            reduce_method=ReduceToDisplacementFieldMethod(),
            initial_transform=initial,
            fixed_chunk_size=[a.block] * DIM,
            overlap_factors=[a.overlap] * DIM,
            # forwarded to the block method ...
            elx_parameter_object_serial=serial,
            itk_transform_types=transform_types,
            # ... and to the reduce
            displacement_grid_scale_factors=[float(a.factor)] * DIM,
        )
        numblocks = schedule.fixed_da.numblocks
        nblocks = int(np.prod(numblocks))
        log(f"graph built: {nblocks} blocks {list(numblocks)} (numpy order); computing")
        result = schedule.registration_result.compute()
        register_s = time.perf_counter() - t0
        log(f"registration done in {register_s:.2f} s")

        status = np.asarray(result.status)
        values, counts = np.unique(status, return_counts=True)
        block_status = {
            BlockRegStatus(int(v)).name: int(c) for v, c in zip(values, counts, strict=True)
        }
        log(f"block status: {block_status}")

        t1 = time.perf_counter()
        transform = result.transforms.transform
        field = displacement_field_of(transform)
        if field is None:
            log(f"reduce gave {type(transform).__name__}; sampling it on a grid")
            field = sample_transform(transform, a.fixed, a.factor)
        itk.imwrite(writable(field), a.out_field)
        write_s = time.perf_counter() - t1
        log(f"wrote {a.out_field} in {write_s:.2f} s")

    print(json.dumps({
        "register_s": round(register_s, 3),
        "write_s": round(write_s, 3),
        "blocks": nblocks,
        "block_status": block_status,
        "field_shape_xyz": [int(s) for s in itk.size(field)],
        "field_spacing": [float(s) for s in itk.spacing(field)],
        "field_origin": [float(s) for s in itk.origin(field)],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
