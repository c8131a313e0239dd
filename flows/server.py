"""Run a real Prefect API server (e.g. on PostgreSQL) for server mode and Dask fan-out.

Ephemeral mode needs nothing running but starts a server inside every process; Dask workers
are processes, so fan-out wants one shared server: start it here (or run
`prefect server start` yourself) and point PREFECT_API_URL at it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

from conceptflow.services import free_port, local_service


@contextmanager
def prefect_server(database_url: str | None = None, port: int | None = None,
                   timeout_s: float = 180) -> Iterator[str]:
    """Start ``prefect server start`` on 127.0.0.1; yield its API URL; stop it on exit.

    ``database_url`` e.g. ``postgresql+asyncpg://postgres@127.0.0.1:5432/prefect``; default:
    a SQLite file in a temporary PREFECT_HOME.
    """
    port = port or free_port()
    env = {**os.environ, "PREFECT_HOME": tempfile.mkdtemp(prefix="prefect-server-"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    api_url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with local_service("prefect server", command, f"{api_url}/health", env, timeout_s):
        yield api_url
