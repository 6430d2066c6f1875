"""The `dreg` command line.

Expected errors (bad input, unreachable storage) print one line naming the input and the
cause and exit with status 2; no traceback. Prefect is imported only by the commands
that run flows, so `dreg info` and friends start fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from dreg.errors import DregError, InputError, RunFailed
from dreg.memory import release_freed_memory_promptly
from flows import apply_commands, run_commands
from flows.events import INTERRUPT_MARKERS


def _triple(text: str, kind=float, name: str = "value") -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected three numbers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{name}: expected 1 or 3 numbers, got {text!r}")
    return values


def _direction(text: str) -> tuple:
    values = [float(v) for v in text.split(",")]
    if len(values) != 9:
        raise argparse.ArgumentTypeError("--direction takes 9 numbers, row by row")
    return tuple(tuple(values[r * 3 : r * 3 + 3]) for r in range(3))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreg", description="Distributed registration of large 3D images."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print an OME-Zarr image's metadata as JSON")
    info.add_argument("uri")
    info.set_defaults(run=cmd_info)

    synth = sub.add_parser("synth", help="make a synthetic pair with an exact ground truth")
    synth.add_argument("out", help="folder or s3:// prefix for fixed/moving/truth.ome.zarr")
    synth.add_argument("--shape", type=lambda t: _triple(t, int, "--shape"), default=(64, 64, 64),
                       help="Z,Y,X voxels")
    synth.add_argument("--spacing", type=lambda t: _triple(t, float, "--spacing"),
                       default=(1.0, 1.0, 1.0), help="X,Y,Z spacing (ITK order)")
    synth.add_argument("--origin", type=lambda t: _triple(t, float, "--origin"),
                       default=(0.0, 0.0, 0.0), help="X,Y,Z origin (ITK order)")
    synth.add_argument("--direction", type=_direction,
                       default=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
                       help="9 numbers, row by row; columns are the i, j, k axis directions")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--amplitude", type=float, default=2.0,
                       help="peak local displacement per component, in voxels")
    synth.add_argument("--shift", type=lambda t: _triple(t, float, "--shift"),
                       default=(0.0, 0.0, 0.0), help="global shift Z,Y,X in voxels")
    synth.add_argument("--chunks", type=int, default=64)
    synth.add_argument("--workers", type=int, default=2)
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(run=cmd_synth)

    convert = sub.add_parser("convert", help="import .nii/.nii.gz/.mha/.nrrd/.tif as OME-Zarr")
    convert.add_argument("input")
    convert.add_argument("out")
    convert.add_argument("--chunks", type=int, default=64)
    convert.add_argument("--workers", type=int, default=2)
    convert.add_argument("--overwrite", action="store_true")
    convert.set_defaults(run=cmd_convert)

    # Commands that run flows import Prefect only when they run.
    run_commands.add_commands(sub)
    apply_commands.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RunFailed as exc:
        print(f"dreg: failed: {exc}", file=sys.stderr)
        return 1
    except DregError as exc:
        print(f"dreg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dreg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A signal that lands while Prefect serialises a task's context arrives wrapped in
        # a serialisation error: it is still an interrupt, not a failure of the run.
        if any(marker in str(exc) for marker in INTERRUPT_MARKERS):
            print("dreg: interrupted", file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
