"""Concept Conductor parity with the reference (Nihukat/Concept-Conductor): runs
``benchmarks/conductor_parity.py`` when a reference checkout is found ($CONDUCTOR_REFERENCE or
/tmp/conductor-ref), else skips; the script's own no-reference path is always checked."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "conductor_parity.py"


def _load():
    spec = importlib.util.spec_from_file_location("conductor_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parity_script_without_reference_says_skipped(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--reference", str(tmp_path / "absent")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "parity skipped: reference not found"
    assert "Concept-Conductor" in lines[0]


def test_mask_refinement_and_fusion_match_the_reference():
    parity = _load()
    root = parity.find_reference(None)
    if root is None:
        pytest.skip("Concept-Conductor reference not found (set CONDUCTOR_REFERENCE or put it in "
                    "/tmp/conductor-ref; see benchmarks/conductor_parity.py)")
    ref = parity.load_reference(root)
    lines = []
    total = parity.run(ref, quick=True, out=lines.append)
    assert lines[-1] == f"conductor parity max diff = {total:g}"
    assert total == 0.0, "\n".join(lines)
    assert int(re.search(r"(\d+) box fallbacks", lines[1]).group(1)) > 0  # the fallback path was exercised
