"""The layering rules hold in every file: deployments → flows → tasks → core → libraries.

The core (`dreg`) imports no Prefect and nothing of tasks, flows or deployments; tasks
import no flows; nothing imports deployments. Flow functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "dreg": ("prefect", "prefect_dask", "tasks", "flows", "deployments"),
    "tasks": ("flows", "deployments"),
    "flows": ("deployments",),
    "bench": ("deployments",),
    "tests": ("deployments",),
}
MAX_FLOW_LINES = 60


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    offences = []
    for path in sorted((REPO / package).rglob("*.py")):
        for module in imported_modules(path):
            if module.split(".")[0] in FORBIDDEN[package]:
                offences.append(f"{path.relative_to(REPO)} imports {module}")
    assert not offences, offences


def test_the_core_is_split_by_area():
    for area in ("io", "registration", "transform", "qc"):
        assert (REPO / "dreg" / area / "__init__.py").is_file(), area
    top_level = sorted(p.name for p in (REPO / "dreg").glob("*.py") if p.name != "__init__.py")
    assert len(top_level) <= 6, top_level


def test_flow_functions_are_short():
    long_flows = []
    for path in sorted((REPO / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            is_flow = any(
                (isinstance(d, ast.Call) and getattr(d.func, "id", "") == "flow")
                or getattr(d, "id", "") == "flow"
                for d in node.decorator_list
            )
            lines = node.end_lineno - node.lineno + 1
            if is_flow and lines > MAX_FLOW_LINES:
                long_flows.append(f"{path.name}:{node.name} has {lines} lines")
    assert not long_flows, long_flows
