"""The `dreg` entry point: parse, run one command, turn expected errors into one line."""

from __future__ import annotations

import argparse
import sys

from cli import apply, images, qc, register
from dreg.errors import DregError, RunFailed, one_line
from flows.events import INTERRUPT_MARKERS


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line every bad input gets (exit status 2):
    `dreg: error: dreg COMMAND: argument --workers: ...`; --help still shows usage."""

    def error(self, message: str):
        self.exit(2, f"dreg: error: {one_line(f'{self.prog}: {message}')}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dreg", description="Distributed registration of large 3D images."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (images, register, apply, qc):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RunFailed as exc:
        print(f"dreg: failed: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except DregError as exc:
        print(f"dreg: error: {one_line(str(exc))}", file=sys.stderr)
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
