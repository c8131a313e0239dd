"""The Prefect API server of one ``conceptflow run`` that configures none, started at the run's start.

Prefect's ephemeral mode starts a temporary API server (on the PREFECT_HOME database) inside the
flow call: the run first imports Prefect's server modules itself (~4 s) and then waits for the
server process to import and start (~5 s), all before the first task. ``conceptflow run`` (thread
runner, no server configured) instead starts ``prefect server start`` (127.0.0.1, a free port, no
UI, no services, the same PREFECT_HOME database, so flow runs land where the ephemeral server puts
them) first thing (stopped at once when nothing is to run), imports and checks while it starts,
and points the flow at it for this process only (``temporary_settings``). The server stops after the run (after
Prefect has flushed its logs and events to it, at exit) and dies with the run if the run is killed
(``PR_SET_PDEATHSIG``): nothing outlives the command. If it is not healthy in time (the startup
timeout Prefect uses for its ephemeral server), it is stopped and the run uses the ephemeral mode.

``prefect_server_configured`` says whether a server is configured (then the run uses it, and never
skips its flow), without importing Prefect when nothing could configure one.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from conceptflow.services import free_port, http_ok

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent (the run) dies, even by ``kill -9``."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the run's exit handler still stops it
        pass


class RunServer:
    """``prefect server start`` for one run; ``api()`` waits for it and points Prefect at it."""

    def __init__(self, home: Path | None = None):
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
        if home is not None:
            env["PREFECT_HOME"] = str(home)
        self.log = tempfile.NamedTemporaryFile(prefix="conceptflow-prefect-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-ui", "--no-services", "--analytics-off"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent)
        # Registered before Prefect registers its own exit handlers, so it runs after them (LIFO):
        # the logs and events Prefect flushes at exit reach the server before it stops.
        atexit.register(self.stop)

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not http_ok(f"{self.api_url}/health"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    @contextmanager
    def api(self) -> Iterator[str | None]:
        """Inside the block Prefect uses this server (yields its URL), or its ephemeral mode (None)
        when the server did not start in time."""
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

        if not self.wait(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())):
            tail = Path(self.log.name).read_text(errors="replace")[-2000:]
            self.stop()
            warnings.warn(f"the run's Prefect server did not start (exit code {self.process.poll()}); using Prefect's "
                          f"ephemeral mode. Its log ends:\n{tail}", stacklevel=2)
            yield None
            return
        with temporary_settings({PREFECT_API_URL: self.api_url}):
            yield self.api_url

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def prefect_server_configured() -> bool:
    """Whether Prefect talks to a server (``PREFECT_API_URL`` in the environment, the active profile,
    ``.env``, ``prefect.toml`` or pyproject's ``[tool.prefect]``) rather than its ephemeral one: there,
    every run is expected to show as a flow run. Prefect's own settings decide whenever one of those
    files could say so; with none of them, no Prefect import (seconds) is needed."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    could_say = {Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml"): "PREFECT_API_URL",
                 Path(".env"): "PREFECT_API_URL", Path("prefect.toml"): "", Path("pyproject.toml"): "tool.prefect"}
    if not any(path.is_file() and marker in path.read_text(errors="replace") for path, marker in could_say.items()):
        return False
    from prefect.settings import get_current_settings  # reads the environment and those files

    return bool(get_current_settings().api.url)
