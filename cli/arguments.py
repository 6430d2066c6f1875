"""Argument types and the options shared by commands. Options that fill a typed model
take their default and help from the model's field, so each default is written once."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel

from flows.options import RunOptions


def triple(text: str, kind=float, name: str = "value") -> tuple:
    """Three comma-separated numbers, or one repeated three times."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected three numbers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{name}: expected 1 or 3 numbers, got {text!r}")
    return values


def direction(text: str) -> tuple:
    """A 3×3 direction matrix as nine numbers, row by row."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--direction: expected 9 numbers, got {text!r}") from None
    if len(values) != 9:
        raise argparse.ArgumentTypeError("--direction takes 9 numbers, row by row")
    return tuple(tuple(values[r * 3 : r * 3 + 3]) for r in range(3))


def model_option(parser: argparse.ArgumentParser, flag: str, model: type[BaseModel],
                 name: str, **kwargs: Any) -> None:
    """Add `flag` for the model's field `name`: its default and help come from the field.
    A boolean field that defaults to true becomes a `--no-…` switch."""
    field = model.model_fields[name]
    default = field.default
    help_text = kwargs.pop("help", field.description or "")
    if isinstance(default, bool):
        kwargs.setdefault("action", "store_false" if default else "store_true")
    elif default is not None:
        help_text += f" (default {default})"
    parser.add_argument(flag, dest=name, default=default, help=help_text, **kwargs)


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """--dask-address and --workers: where the flow's tasks run."""
    model_option(parser, "--dask-address", RunOptions, "dask_address", metavar="ADDRESS")
    model_option(parser, "--workers", RunOptions, "workers", type=int, metavar="N")


def run_options(args: argparse.Namespace, **overrides: Any) -> RunOptions:
    """The RunOptions a command's arguments fill; fields it has no option for keep their
    model defaults."""
    given = {name: getattr(args, name) for name in RunOptions.model_fields if hasattr(args, name)}
    return RunOptions(**{**given, **overrides})
