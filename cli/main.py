"""The `dreg` entry point: parse, run one command, turn expected errors into one line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dreg.errors import DregError, RunFailed, one_line
from dreg.process import enable_stack_dumps
from flows.events import INTERRUPT_MARKERS


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line every bad input gets (exit status 2):
    `dreg: error: dreg COMMAND: argument --workers: ...`; --help still shows usage."""

    def error(self, message: str):
        self.exit(2, f"dreg: error: {one_line(f'{self.prog}: {message}')}\n")


# The modules that define the commands, in the order `dreg --help` lists them.
GROUPS = ("images", "register", "events", "apply", "qc", "view")
# Commands whose module is light, run once per volume by other systems: only that module
# is imported for them (the others import zarr, SciPy and more: 0.4 s of CPU a call).
LIGHT_COMMANDS = {"emit-ingested": "events"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: every command's, or only its own for a light command."""
    parser = Parser(
        prog="dreg", description="Distributed registration of large 3D images."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    first = (argv if argv is not None else sys.argv[1:])[:1]
    groups = [LIGHT_COMMANDS[first[0]]] if first and first[0] in LIGHT_COMMANDS else GROUPS
    for group in groups:
        importlib.import_module(f"cli.{group}").add_commands(sub)
    return parser


# Outputs follow the umask: world-readable under the usual 022. DREG_PRIVATE=1 makes
# every file and folder this command (and its local Dask workers, which inherit the
# umask) creates readable by its owner only.
PRIVATE_VARIABLE = "DREG_PRIVATE"
PRIVATE_UMASK = 0o077


def apply_private_mode() -> bool:
    """With DREG_PRIVATE set (to anything but 0 or empty), create files owner-only."""
    if os.environ.get(PRIVATE_VARIABLE, "").strip() in ("", "0"):
        return False
    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)  # never loosens a stricter umask
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    apply_private_mode()
    enable_stack_dumps()
    try:
        return _run(args)
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
