"""flows.run_server.prefect_server_configured: which runs may skip the flow when nothing changed.

Each case runs in a fresh interpreter in its own folder (Prefect reads its settings once per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER = "http://127.0.0.1:4200/api"


@pytest.mark.parametrize("environment, files, expected", [
    ({}, {}, False),  # nothing configured: ephemeral (and no Prefect import needed to say so)
    ({"PREFECT_API_URL": SERVER}, {}, True),
    ({}, {"home/profiles.toml": f'active = "work"\n[profiles.work]\nPREFECT_API_URL = "{SERVER}"\n'}, True),
    ({}, {"prefect.toml": f'[api]\nurl = "{SERVER}"\n'}, True),
    ({}, {"prefect.toml": "[logging]\nlevel = \"INFO\"\n"}, False),  # a file that could say so but does not
    ({}, {".env": f"PREFECT_API_URL={SERVER}\n"}, True),
])
def test_a_prefect_server_is_seen_wherever_prefect_would_read_it(tmp_path, environment, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), **environment)
    code = ("import sys; from flows.run_server import prefect_server_configured as f; "
            "print(f(), 'prefect' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    configured, imported = result.stdout.split()
    assert configured == str(expected)
    if not files and not environment:
        assert imported == "False"
