"""Argument types and the options shared by commands. Options that fill a typed model
take their default and help from the model's field, so each default is written once."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from flows.options import RunOptions


def number(kind=float, low: float | None = None, high: float | None = None) -> Callable:
    """An argument type: one finite number (`kind`: int or float) from `low` to `high`."""
    noun = "a whole number" if kind is int else "a number"
    bounds = (f" from {low:g} to {high:g}" if low is not None and high is not None
              else f" of at least {low:g}" if low is not None
              else f" of at most {high:g}" if high is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (low is not None and value < low) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {noun}{bounds}, got {text!r}")
        return value

    return parse


def triple(text: str, kind=float, name: str = "value") -> tuple:
    """Three comma-separated finite numbers, or one repeated three times."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 1 or 3 numbers, got {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def direction(text: str) -> tuple:
    """A 3×3 direction matrix as nine finite numbers, row by row."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 9 numbers, got {text!r}") from None
    if len(values) != 9:
        raise argparse.ArgumentTypeError("takes 9 numbers, row by row")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return tuple(tuple(values[r * 3 : r * 3 + 3]) for r in range(3))


def _field_type(model: type[BaseModel], name: str, kind: Callable) -> Callable:
    """An argument type that parses with `kind` and checks the value against the model
    field's own constraints (bounds, finiteness), so a bad option is refused while the
    arguments are parsed: before anything is planned or written."""
    field = model.model_fields[name]
    adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)])

    def parse(text: str):
        try:
            return adapter.validate_python(kind(text))
        except (ValueError, ValidationError) as exc:
            if isinstance(exc, ValidationError):
                reason = exc.errors()[0]["msg"]
                reason = reason[0].lower() + reason[1:]
            else:
                reason = "not a number"
            raise argparse.ArgumentTypeError(f"{reason}, got {text!r}") from None

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def model_option(parser: argparse.ArgumentParser, flag: str, model: type[BaseModel],
                 name: str, **kwargs: Any) -> None:
    """Add `flag` for the model's field `name`: its default and help come from the field.
    A boolean field that defaults to true becomes a `--no-…` switch."""
    field = model.model_fields[name]
    default = field.default
    help_text = kwargs.pop("help", field.description or "")
    if "type" in kwargs:
        kwargs["type"] = _field_type(model, name, kwargs["type"])
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
    model defaults. An invalid combination is an InputError (one line), not a traceback."""
    from dreg.errors import InputError
    from flows.cluster import environment_workers

    environment_workers()  # a bad DREG_DASK_WORKERS is refused now, not when a cluster starts
    given = {name: getattr(args, name) for name in RunOptions.model_fields if hasattr(args, name)}
    try:
        return RunOptions(**{**given, **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InputError(f"options: {problems}") from None
