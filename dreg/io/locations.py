"""Where an output may go: never onto an input, into one, nor over one.

A result written into an input's folder changes that input for every tool that reads it
(and for this project's content versions); an output created over a folder that holds
an input replaces the input. Both are refused before any work, naming both locations.

Locations are compared in a canonical form: local paths absolute with symbolic links,
``.``, ``..`` and trailing slashes resolved; ``s3://`` URIs with their key's ``.``,
``..``, repeated and trailing slashes collapsed (S3 keys are plain strings, but a key
spelled with ``..`` names the same place to every user of this project).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from dreg.errors import InputError
from dreg.io import storage


def canonical(uri: str) -> str:
    """The one spelling of a local path or ``s3://`` URI used to compare locations."""
    text = str(uri)
    if not storage.is_s3(text):
        return storage.normalize_uri(text)
    bucket, _, key = text.removeprefix("s3://").partition("/")
    # A leading "/" keeps ".." from climbing out of the bucket, as it cannot on S3.
    key = posixpath.normpath("/" + key).lstrip("/")
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def within(inner: str, outer: str) -> bool:
    """Whether `inner` is `outer` or lies below it."""
    inner, outer = canonical(inner), canonical(outer)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_apart(output: str, output_name: str, inputs: Mapping[str, str | None],
                may_hold_inputs: bool = False) -> None:
    """Refuse an output that is an input, lies inside one, or (unless `may_hold_inputs`)
    holds one below it. `inputs` maps names (FIXED, MOVING, "the field", ...) to
    locations; None entries are skipped. Raises InputError naming both locations."""
    for name, uri in inputs.items():
        if uri is None:
            continue
        if canonical(output) == canonical(uri):
            raise InputError(f"{output_name} {output} is {name} {uri}: a result must not "
                             "replace an input; choose another location")
        if within(output, uri):
            raise InputError(f"{output_name} {output} is inside {name} {uri}: a result "
                             "must not be written into an input; choose a location outside it")
        if not may_hold_inputs and within(uri, output):
            raise InputError(f"{name} {uri} is inside {output_name} {output}: an output "
                             "location must not hold an input (a run replaces what it writes "
                             "there); choose another location")


def inside(uri: str, out: str) -> str:
    """How a record in OUT stores a location: relative to OUT (``stages/1-affine/...``)
    when it lies inside OUT, so that a copied or moved OUT still names its own parts;
    anything else (an input) as it is."""
    if not within(uri, out) or canonical(uri) == canonical(out):
        return uri
    return canonical(uri)[len(canonical(out).rstrip("/")) + 1:]


def is_relative(path: str) -> bool:
    """Whether a recorded location is relative (to the OUT holding the record)."""
    return not storage.is_s3(path) and "://" not in path and not posixpath.isabs(path)


def resolve(path: str, out: str, recorded: str | None = None) -> str:
    """A location read from a record in OUT, as the OUT given to the command: a relative
    path joined to OUT; an absolute one inside `recorded` (the OUT the record was
    written in: older records stored absolute locations) moved to the same place in
    OUT; anything else (an input) as it is."""
    if is_relative(path):
        return storage.join(out, path)
    if recorded is not None and within(path, recorded):
        relative = inside(path, recorded)
        return out if relative == path else storage.join(out, relative)
    return path
