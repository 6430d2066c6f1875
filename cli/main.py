"""The `dreg` entry point: parse, run one command, turn expected errors into one line."""

from __future__ import annotations

import argparse
import sys

from cli import apply, images, qc, register
from dreg.errors import DregError, RunFailed
from flows.events import INTERRUPT_MARKERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        return _run(args)
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


def _run(args: argparse.Namespace) -> int:
    """Run the command; if it ran a flow, stop the processes that started with it (the
    temporary API server, see `flows.children`) and wait for them before returning."""
    try:
        return args.run(args)
    finally:
        if "flows.children" in sys.modules:
            from flows.children import stop_children

            stop_children()


if __name__ == "__main__":
    sys.exit(main())
