"""`dreg warp`, `dreg invert`, `dreg transform-points` and `dreg export`: use a finished
registration.

Each checks its inputs first (bad input: one line, exit 2, before a server or cluster
starts), runs its flow on the embedded defaults or the given Dask cluster (export is a
local one-process step, with no flow), and prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os

from cli.arguments import add_cluster_options, model_option, run_options
from dreg.io import ownership
from flows.options import RunOptions


def _options(args: argparse.Namespace):
    """The run's options, once the input is checked: the temporary API server (when no
    API is configured) starts here and comes up while the command imports its flow."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    options = run_options(args)
    from flows.children import use_temporary_server

    use_temporary_server()
    return options


def _served() -> None:
    from flows.children import wait_for_temporary_server

    wait_for_temporary_server()


def cmd_warp(args: argparse.Namespace) -> int:
    from dreg.apply.plan import plan_warp

    ownership.check_free(plan_warp(args.out, args.image, args.to, args.interpolation,
                                   overwrite=args.overwrite).out)
    options = _options(args)
    from flows.warp import warp_image

    _served()
    result = warp_image(args.out, args.image, args.to, args.interpolation, options)
    print(result.model_dump_json())
    return 0


def cmd_invert(args: argparse.Namespace) -> int:
    from dreg.apply.plan import plan_invert

    ownership.check_free(plan_invert(args.out).out)
    options = _options(args)
    from flows.invert import invert_field

    _served()
    print(invert_field(args.out, options).model_dump_json())
    return 0


def cmd_transform_points(args: argparse.Namespace) -> int:
    from dreg.apply.plan import plan_points

    if plan_points(args.out, args.input, args.output, args.source).needs_inverse:
        ownership.check_free(args.out)
    options = _options(args)
    from flows.points import transform_points_file

    _served()
    result = transform_points_file(args.out, args.input, args.output, args.source, options)
    print(json.dumps(result.model_dump(mode="json")))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dreg.apply.export import export

    print(export(args.out, args.dest, args.what, overwrite=args.overwrite).model_dump_json())
    return 0


def add_commands(sub) -> None:
    warp = sub.add_parser(
        "warp", help="resample an image onto the fixed grid through OUT's field",
        description="Resample an image in the moving image's physical space (any grid; "
        "default: the registration's moving image) onto the fixed image's full-resolution "
        "grid through OUT/field.ome.zarr. Writes an OME-Zarr 0.5 pyramid keeping the "
        "input's dtype; 0 outside the input.")
    warp.add_argument("out", help="a finished registration's output (holds result.json)")
    warp.add_argument("--image", default=None, help="the image to warp (default: moving)")
    warp.add_argument("--to", default=None, help="destination (default: OUT/warped.ome.zarr)")
    warp.add_argument("--interpolation", choices=("linear", "nearest"), default="linear",
                      help="nearest keeps integer labels exact (default: linear)")
    model_option(warp, "--overwrite", RunOptions, "overwrite",
                 help="replace an image at the destination (only an OME-Zarr image that "
                 "dreg wrote; anything else is refused)")
    add_cluster_options(warp)
    warp.set_defaults(run=cmd_warp)

    invert = sub.add_parser(
        "invert", help="write OUT/inverse.ome.zarr, the field from moving to fixed",
        description="Invert OUT/field.ome.zarr chunk by chunk on the moving image's grid "
        "(same spacing factor as the field). NaN where a moving point has no preimage in "
        "the fixed domain; the round-trip error goes to OUT/inverse.json.")
    invert.add_argument("out", help="a finished registration's output (holds result.json)")
    add_cluster_options(invert)
    invert.set_defaults(run=cmd_invert)

    points = sub.add_parser(
        "transform-points", help="move x, y, z columns between fixed and moving space",
        description="Read IN (CSV or Parquet, by extension) whose x, y, z columns are world "
        "coordinates in the --from space; write OUTFILE with the same rows in the same "
        "order, x, y, z moved to the other space (NaN outside the field) and every other "
        "column kept. --from fixed applies the field; --from moving the inverse, computed "
        "first if OUT has none.")
    points.add_argument("out", help="a finished registration's output (holds result.json)")
    points.add_argument("input", metavar="IN")
    points.add_argument("output", metavar="OUTFILE")
    points.add_argument("--from", dest="source", choices=("fixed", "moving"), required=True)
    add_cluster_options(points)
    points.set_defaults(run=cmd_transform_points)

    export = sub.add_parser(
        "export", help="write OUT's field, inverse or initial affine for ITK, ANTs, Slicer "
        "or Learn2Reg",
        description="Write one file, its format by DEST's extension: .nii.gz, .nii, .nrrd, "
        ".mha (an ITK displacement-field image: x, y, z vectors in physical units on the "
        "field's grid; NIfTI with intent 1006), .h5, .tfm (an ITK transform file: a "
        "DisplacementFieldTransform, after the initial affine where there is one), .mat "
        "(the affine only), .npz (Learn2Reg: voxel displacements on the fixed grid, where "
        "fixed and moving share one grid). Fields above DREG_EXPORT_MAX_VOXELS voxels are "
        "refused: use the OME-Zarr field.")
    export.add_argument("out", help="a finished registration's output (holds result.json)")
    export.add_argument("dest", metavar="DEST", help="the file to write (a local path)")
    export.add_argument("--what", choices=("field", "inverse", "affine"), default="field",
                        help="field (fixed to moving, default), inverse (moving to fixed, "
                        "made by `dreg invert`) or affine (the initial affine)")
    export.add_argument("--overwrite", action="store_true", help="replace a file at DEST")
    export.set_defaults(run=cmd_export)
