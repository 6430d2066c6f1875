"""`dreg info`, `dreg synth` and `dreg convert`: look at, make and import images."""

from __future__ import annotations

import argparse
import json

from cli.arguments import direction, number, triple
from dreg.errors import InputError
from dreg.process import release_freed_memory_promptly

# dreg.synth.DTYPES, written out so that building the parser imports no NumPy.
SYNTH_DTYPES = ("float32", "uint16", "uint8")

IDENTITY_DIRECTION = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
# Chunk edges in voxels: below 8 a volume is mostly chunk overhead; above 512 one chunk
# (512 MiB of float32) is more than a worker should hold several of.
CHUNK_RANGE = (8, 512)
MAX_IO_WORKERS = 256  # threads that read and write chunks


def cmd_info(args: argparse.Namespace) -> int:
    from dreg.io import ome_zarr

    image = ome_zarr.open_image(args.uri)
    description = {
        **image.describe(),
        "ome_version": image.ome_version,
        "attributes": image.attributes,
    }
    print(json.dumps(description, indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from dreg import synth
    from dreg.grid import Grid

    release_freed_memory_promptly()

    try:
        grid = Grid(
            shape_zyx=args.shape,
            spacing_xyz=args.spacing,
            origin_xyz=args.origin,
            direction=args.direction,
        )
    except ValueError as exc:
        raise InputError(f"dreg synth {args.out}: invalid grid: {exc}") from None
    summary = synth.write_pair(
        args.out,
        grid,
        seed=args.seed,
        amplitude_voxels=args.amplitude,
        shift_voxels=args.shift,
        chunks=args.chunks,
        workers=args.workers,
        overwrite=args.overwrite,
        dtype=args.dtype,
    )
    print(json.dumps(summary))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from dreg.io import convert

    release_freed_memory_promptly()
    image = convert.convert(
        args.input, args.out, chunks=args.chunks, workers=args.workers, overwrite=args.overwrite
    )
    print(json.dumps(image.describe()))
    return 0


def add_commands(sub) -> None:
    info = sub.add_parser("info", help="print an OME-Zarr image's metadata as JSON")
    info.add_argument("uri")
    info.set_defaults(run=cmd_info)

    synth = sub.add_parser("synth", help="make a synthetic pair with an exact ground truth")
    synth.add_argument("out", help="folder or s3:// prefix for fixed/moving/truth.ome.zarr")
    synth.add_argument("--shape", type=lambda t: triple(t, int, "--shape"), default=(64, 64, 64),
                       help="Z,Y,X voxels")
    synth.add_argument("--spacing", type=lambda t: triple(t, float, "--spacing"),
                       default=(1.0, 1.0, 1.0), help="X,Y,Z spacing (ITK order)")
    synth.add_argument("--origin", type=lambda t: triple(t, float, "--origin"),
                       default=(0.0, 0.0, 0.0), help="X,Y,Z origin (ITK order)")
    synth.add_argument("--direction", type=direction, default=IDENTITY_DIRECTION,
                       help="9 numbers, row by row; columns are the i, j, k axis directions")
    synth.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)
    synth.add_argument("--amplitude", type=number(float, 0), default=2.0,
                       help="peak local displacement per component, in voxels")
    synth.add_argument("--shift", type=lambda t: triple(t, float, "--shift"),
                       default=(0.0, 0.0, 0.0), help="global shift Z,Y,X in voxels")
    synth.add_argument("--dtype", choices=SYNTH_DTYPES, default="float32",
                       help="the images' dtype; integers hold the texture scaled into their range")
    synth.add_argument("--chunks", type=number(int, *CHUNK_RANGE), default=64)
    synth.add_argument("--workers", type=number(int, 1, MAX_IO_WORKERS), default=2)
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(run=cmd_synth)

    convert = sub.add_parser("convert", help="import .nii/.nii.gz/.mha/.nrrd/.tif as OME-Zarr")
    convert.add_argument("input")
    convert.add_argument("out")
    convert.add_argument("--chunks", type=number(int, *CHUNK_RANGE), default=64)
    convert.add_argument("--workers", type=number(int, 1, MAX_IO_WORKERS), default=2)
    convert.add_argument("--overwrite", action="store_true")
    convert.set_defaults(run=cmd_convert)
