"""Run a local HTTP service (``mlflow server``, ``prefect server start``) for a block of code.

The two launchers that use it live in ``flows/server.py`` (``prefect_server``, ``mlflow_server``).

The service starts in its own process group on 127.0.0.1 (servers that spawn workers stop
with them), is polled on its health URL, and is stopped when the block exits. Its log is
deleted on success and kept, with its path in the error, when it fails to start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from conceptflow.errors import ConceptflowError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextmanager
def local_service(name: str, command: Sequence[str], health_url: str, env: Mapping[str, str] | None = None,
                  timeout_s: float = 180.0) -> Iterator[subprocess.Popen]:
    """Start ``command``; yield its process once ``health_url`` answers 200; stop it afterwards."""
    slug = "".join(c if c.isalnum() else "-" for c in name)[:40]
    log = tempfile.NamedTemporaryFile(prefix=f"{slug}-", suffix=".log", delete=False)
    process = subprocess.Popen(list(command), env=dict(env) if env is not None else None, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not http_ok(health_url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace")[-3000:]
                raise ConceptflowError(f"{name} did not become healthy at {health_url} (exit code {process.poll()}); "
                                       f"its log {log.name} ends:\n{tail}")
            time.sleep(0.25)
        yield process
    finally:
        stop_process_group(process)
        log.close()
    Path(log.name).unlink(missing_ok=True)
