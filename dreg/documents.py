"""YAML documents a user or an operator gives (a pipeline, a nightly manifest), read
with bounds: a small file must not expand into a large one.

YAML aliases (``*name``, with their anchors ``&name``) are refused: a few hundred bytes of
nested aliases expand into gigabytes (a "billion laughs"), and a configuration has no
need of them. The text is bounded in size, and a syntax error is one line that says
where.
"""

from __future__ import annotations

from typing import Any

import yaml

from dreg.errors import InputError

MAX_DOCUMENT_BYTES = 1 << 20  # a pipeline or a manifest is kilobytes


class _AliasRefused(yaml.MarkedYAMLError):
    """An alias or anchor, which these documents do not accept."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only), refusing aliases and anchors."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise _AliasRefused(
                problem="YAML aliases and anchors (*name, &name) are not accepted",
                problem_mark=mark)
        return super().compose_node(parent, index)


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def load_yaml(text: str, source: str) -> Any:
    """Parse `text` (from `source`, named in errors) as plain YAML data; InputError in
    one line when it is too large, uses aliases, or is not valid YAML."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise InputError(f"{source}: {len(text)} characters, more than a configuration may "
                         f"hold ({MAX_DOCUMENT_BYTES})")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a safe loader
    except _AliasRefused as exc:
        raise InputError(f"{source}: {_where(exc)}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML: {_where(exc)}") from None
