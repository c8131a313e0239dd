"""Layering rules the design relies on: no Prefect in the core, no torch math in tasks/flows."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    pattern = re.compile(r"^\s*(?:from|import)\s+([a-zA-Z_][\w]*)", re.MULTILINE)
    return set(pattern.findall(path.read_text()))


@pytest.mark.parametrize("path", sorted((ROOT / "conceptflow").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_library_has_no_prefect(path):
    assert "prefect" not in imports(path) and "prefect_dask" not in imports(path)


@pytest.mark.parametrize("path", sorted((ROOT / "tasks").glob("*.py")) + sorted((ROOT / "flows").glob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_orchestration_has_no_torch(path):
    assert not {"torch", "diffusers", "transformers"} & imports(path)


# The library's layers, lowest first: a module may import its own unit and units of lower
# layers, never a higher one. A unit is a top-level module or package of conceptflow/, except
# that the stage framework (stages.base, stages.table) sits below the registry and the report,
# which the stage modules themselves use. ``serving`` reads the registry and is what the
# register stage saves each version's pyfunc model with.
LAYERS = (
    {"(root)", "errors", "schema", "fileio", "locks", "seeding", "manifest", "services", "tool_env", "lineage",
     "plots", "torch_threads", "remote_workspace", "tracking", "dvc_calls"},
    {"models", "attention"},
    {"adapters"},
    {"train"},
    {"methods"},
    {"sample"},
    {"fuse"},
    {"exports"},
    {"config"},
    {"layout", "data", "metrics"},
    {"validation"},
    {"toy"},
    {"stages.base", "stages.table"},
    {"registry", "report"},
    {"serving"},
    {"stages"},
    {"provenance"},
    {"cli"},
)
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "(root)"
    if parts[0] == "stages" and len(parts) > 1 and f"stages.{parts[1]}" in LEVEL:
        return f"stages.{parts[1]}"
    return parts[0]


def library_imports(path: Path) -> list[tuple[str, int]]:
    """Every conceptflow module ``path`` imports (also inside functions), with its line."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "conceptflow":
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "conceptflow")
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", sorted((ROOT / "conceptflow").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_back_up_the_layers(path):
    source = unit_of(module_name(path))
    assert source in LEVEL, f"{path}: unit {source!r} has no layer in LAYERS; place it"
    for imported, line in library_imports(path):
        target = unit_of(imported)
        assert target in LEVEL, f"{path}:{line} imports {imported}, whose unit {target!r} has no layer"
        assert LEVEL[target] <= LEVEL[source], (
            f"{path}:{line} imports {imported}: {target!r} (layer {LEVEL[target]}) is above {source!r} "
            f"(layer {LEVEL[source]})")
        if LEVEL[target] == LEVEL[source] and LEVEL[source] != 0:
            assert target == source or {target, source} == {"stages.base", "stages.table"}, (
                f"{path}:{line}: {source!r} and {target!r} share a layer and must not import each other")

