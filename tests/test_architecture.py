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
