"""flows/run_server.py: the Prefect server a `conceptflow run` starts for itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has exited


def test_the_server_answers_and_dies_with_a_run_killed_by_sigkill(tmp_path):
    code = ("import sys, time; from flows.run_server import RunServer; s = RunServer(); "
            "print(s.process.pid, s.wait(120), flush=True); time.sleep(600)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        server_pid, healthy = run.stdout.readline().split()
        assert healthy == "True"
        assert (tmp_path / ".prefect" / "prefect.db").is_file()  # the run's PREFECT_HOME database
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _alive(int(server_pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(int(server_pid)), "the run's Prefect server outlived the killed run"
    finally:
        run.kill()


def test_a_server_that_does_not_start_leaves_the_run_on_the_ephemeral_mode(tmp_path, monkeypatch):
    from flows.run_server import RunServer

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = RunServer(home=tmp_path / ".prefect")
    server.process.kill()  # as if it had crashed on start
    server.process.wait()
    with pytest.warns(UserWarning, match="did not start"):
        with server.api() as url:
            assert url is None
            from prefect.settings import PREFECT_API_URL

            assert not PREFECT_API_URL.value()
