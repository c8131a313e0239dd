"""Prefect flows. Importing this package sets project-local Prefect defaults first.

Ephemeral mode (no server to run) with its state under ./.prefect unless PREFECT_HOME or
PREFECT_API_URL say otherwise; analytics off.
"""

import os
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The ephemeral API server starts in ~8 s on an idle machine; allow for a busy one.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
