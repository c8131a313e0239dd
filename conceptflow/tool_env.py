"""Environment defaults for the tools the pipeline drives (MLflow, Prefect), set by entry points.

Both tools read some settings when they are imported: MLflow decides on telemetry, Prefect fixes
its home folder and logging level. So a default only works if it is in the environment before
that import, and nothing here runs on import: the CLI calls ``use_tool_defaults()`` when it
starts (before any command imports mlflow or prefect); Dask workers and the servers it starts
inherit the environment. A value already set always wins.

- MLflow: no telemetry, no progress bars for artifact transfers (the pipeline runs offline and
  logs to files), one quick HTTP retry (a server that is down fails in seconds, not minutes).
- Prefect: ephemeral mode (no server to run) with its state under ``./.prefect`` unless
  PREFECT_HOME or PREFECT_API_URL say otherwise; analytics off; warnings only; the ephemeral
  API server, which starts in ~8 s on an idle machine, gets 120 s on a busy one.
"""

from __future__ import annotations

import os
from pathlib import Path

# MLflow's own HTTP retries (7 with backoff factor 2: minutes against a server that is down) are cut
# to one quick retry: registration retries whole, boundedly (registry.with_server_retries).
MLFLOW_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                   "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def prefect_defaults(project: Path | None = None) -> dict[str, str]:
    """Prefect's defaults for a run started in ``project`` (default: the current directory)."""
    return {"PREFECT_HOME": str(Path(project or Path.cwd()) / ".prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def use_tool_defaults(project: Path | None = None) -> None:
    """Put the MLflow and Prefect defaults into ``os.environ`` where nothing is set yet."""
    for name, value in {**MLFLOW_DEFAULTS, **prefect_defaults(project)}.items():
        os.environ.setdefault(name, value)
