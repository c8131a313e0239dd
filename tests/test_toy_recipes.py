"""The toy recipes (recipes/toy) stay outside the runtime library: conceptflow/ never imports
them, except the ``conceptflow pretrain-toy`` command, inside its function."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE_IMPORT = re.compile(r"^(\s*)(?:from|import)\s+recipes\b", re.MULTILINE)


def test_the_runtime_library_imports_no_recipe_except_the_pretrain_command():
    found = {}
    for path in sorted((ROOT / "conceptflow").rglob("*.py")):
        for match in RECIPE_IMPORT.finditer(path.read_text()):
            found.setdefault(path.relative_to(ROOT).as_posix(), []).append(match.group(1))
    assert set(found) <= {"conceptflow/cli.py"}, found
    assert all(indent for indent in found.get("conceptflow/cli.py", [])), "cli.py imports recipes at module level"
    cli = (ROOT / "conceptflow" / "cli.py").read_text()
    command = cli[cli.index("def pretrain_toy("):]
    command = command[:command.index("\n\n\n")]
    assert len(RECIPE_IMPORT.findall(command)) == len(found.get("conceptflow/cli.py", []))


def test_the_pretrain_command_reaches_the_recipes():
    from typer.testing import CliRunner

    from conceptflow.cli import app

    result = CliRunner().invoke(app, ["pretrain-toy", "--help"])
    assert result.exit_code == 0 and "--minutes" in result.output
    import recipes.toy.build  # noqa: F401  (what the command imports when it runs)
