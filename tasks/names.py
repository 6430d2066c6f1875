"""Task-run names that say what a task run wrote, for the Prefect UI."""

from __future__ import annotations

from collections.abc import Callable


def written_name(verb: str) -> Callable[[], str]:
    """A task_run_name callable: '<verb>-<the last two parts of the `uri` parameter>',
    e.g. write-1-bspline/blocks.json."""

    def name() -> str:
        from prefect.runtime import task_run

        uri = str((task_run.parameters or {}).get("uri", "")).rstrip("/")
        return f"{verb}-{'/'.join(uri.split('/')[-2:]) or 'output'}"

    return name
