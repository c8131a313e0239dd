"""Run a real Prefect API server (e.g. on PostgreSQL) for server mode and Dask fan-out.

Ephemeral mode needs nothing running but starts a server inside every process; Dask workers
are processes, so fan-out wants one shared server: start it here (or run
`prefect server start` yourself) and point PREFECT_API_URL at it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def prefect_server(database_url: str | None = None, port: int | None = None,
                   timeout_s: float = 180) -> Iterator[str]:
    """Start ``prefect server start`` on 127.0.0.1; yield its API URL; stop it on exit.

    ``database_url`` e.g. ``postgresql+asyncpg://postgres@127.0.0.1:5432/prefect``; default:
    a SQLite file in a temporary PREFECT_HOME.
    """
    port = port or _free_port()
    home = Path(tempfile.mkdtemp(prefix="prefect-server-"))
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(api_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not start; see {log_path}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield api_url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
