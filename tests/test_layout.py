"""The floors hold in every file: imports go one way, down.

    cli, deployments → flows → tasks → dreg.qc → dreg.apply → dreg.registration
    → dreg.field → dreg.io → dreg's base modules (grid, errors, layout, …) → libraries

A module may import its own floor and the floors below it, never one above. The core
(`dreg`) imports no Prefect; nothing imports deployments or the CLI. Flow functions
stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dreg", "tasks", "flows", "cli", "deployments", "bench", "tests")

# The floor of each module prefix; the longest matching prefix wins.
FLOORS = {
    "dreg": 0,  # base modules: grid, errors, layout, compiled, process, trust
    "dreg.io": 1,
    "dreg.field": 2,
    "dreg.registration": 3,
    "dreg.synth": 3,
    "dreg.apply": 4,
    "dreg.qc": 5,
    "tasks": 6,
    "flows": 7,
    "cli": 8,
    "deployments": 8,
    "bench": 9,
    "tests": 9,
}
NOBODY_IMPORTS = ("cli", "deployments")  # entry points: only tests may run the CLI
PREFECT = ("prefect", "prefect_dask")
MAX_FLOW_LINES = 60


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in FLOORS:
            return FLOORS[prefix]
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from dreg import field` imports the subpackage dreg.field
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (REPO / node.module.replace(".", "/") / alias.name).is_dir()
                         or (REPO / node.module.replace(".", "/") / f"{alias.name}.py").is_file())
    return names


def python_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_down(package):
    offences = []
    for path in python_files(package):
        own = floor_of(module_name(path))
        for module in imported_modules(path):
            floor = floor_of(module)
            if floor is not None and floor > own:
                offences.append(f"{path.relative_to(REPO)} (floor {own}) imports {module} "
                                f"(floor {floor})")
    assert not offences, offences


@pytest.mark.parametrize("package", PACKAGES)
def test_entry_points_are_imported_by_nobody(package):
    offences = [f"{path.relative_to(REPO)} imports {module}"
                for path in python_files(package)
                for module in imported_modules(path)
                if module.split(".")[0] in NOBODY_IMPORTS
                and module.split(".")[0] != package
                and not (package == "tests" and module.split(".")[0] == "cli")]
    assert not offences, offences


def test_the_core_imports_no_prefect():
    offences = [f"{path.relative_to(REPO)} imports {module}"
                for path in python_files("dreg")
                for module in imported_modules(path)
                if module.split(".")[0] in PREFECT]
    assert not offences, offences


def test_the_rule_sees_an_upward_import(tmp_path):
    # The checker itself: a field module importing registration is an offence.
    assert floor_of("dreg.field.displacement") < floor_of("dreg.registration.reduce")
    assert floor_of("dreg.layout") == 0 and floor_of("dreg.io.storage") == 1
    assert floor_of("numpy") is None


def test_the_core_is_split_by_area():
    for area in ("io", "field", "registration", "apply", "qc"):
        assert (REPO / "dreg" / area / "__init__.py").is_file(), area
    top_level = sorted(p.name for p in (REPO / "dreg").glob("*.py") if p.name != "__init__.py")
    assert len(top_level) <= 8, top_level


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


def test_test_modules_do_not_import_each_other():
    """Shared test code lives in conftest.py and the helper modules (helpers.py, …)."""
    offences = [f"{path.name} imports {name}"
                for path in python_files("tests")
                for name in imported_modules(path) if name.split(".")[0].startswith("test_")]
    assert not offences, offences
