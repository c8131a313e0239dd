"""Run the real servers of server mode (e.g. on PostgreSQL): a Prefect API server and an MLflow
tracking server, each on 127.0.0.1 for the length of a ``with`` block (``conceptflow.services``).

Prefect: ephemeral mode needs nothing running but starts a server inside every process; Dask
workers are processes, so fan-out wants one shared server: start it here (or run
`prefect server start` yourself) and point PREFECT_API_URL at it. MLflow: the default store is
a SQLite file; a tracking server (``mlflow server``) lets several machines share one registry:
point MLFLOW_TRACKING_URI at it.

Both servers run as subprocesses in their own process group and stop with the block.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
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


@contextmanager
def mlflow_server(backend_store_uri: str, artifacts_dir: Path, port: int | None = None,
                  timeout_s: float = 180.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run ``mlflow server`` on 127.0.0.1 (one worker, job execution off) until the block exits.

    Yields (process, "http://127.0.0.1:<port>"): point MLFLOW_TRACKING_URI at it. Artifacts are
    proxied by the server and land in ``artifacts_dir``. ``backend_store_uri`` e.g.
    ``postgresql://postgres@127.0.0.1:5432/mlflow`` (pinned to psycopg2 when psycopg 3 is absent).
    The first start on an empty database also runs MLflow's migrations (tens of seconds on
    PostgreSQL); later starts take ~7-10 s.
    """
    from conceptflow.registry import normalise_database_uri

    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", normalise_database_uri(backend_store_uri),
               "--artifacts-destination", str(artifacts_dir.resolve()),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with local_service("mlflow server", command, f"{uri}/health", env, timeout_s) as process:
        yield process, uri
