"""A Dask worker preload for tests/test_dask_no_shared_fs.py: an audit of the paths a worker touches.

``dask worker --preload nofs_audit`` installs a ``sys.addaudithook`` hook in the worker process
that watches Python's file events (open, listdir/scandir, copy, rename, remove, mkdir, chdir)
and the program, arguments and cwd of every subprocess it starts (git, dvc). Any event naming
a path under ``$NOFS_AUDIT_FORBID`` (the main project) is written to
``$NOFS_AUDIT_DIR/<pid>.log`` as ``FORBIDDEN <event> <args>``; the first files opened in the
worker's own clones (``<cwd>/conceptflow-worker``, the default ``--worker-root``) are written as
``SEEN open ...`` (proof that the hook sees the worker's reads at all). Python-level only: a C
library opening a file by itself is not seen.
"""

from __future__ import annotations

import os
import sys

FORBID = os.environ.get("NOFS_AUDIT_FORBID", "")
OWN = os.path.join(os.getcwd(), "conceptflow-worker")
EVENTS = {"open", "os.listdir", "os.scandir", "shutil.copyfile", "shutil.copytree", "shutil.rmtree", "os.rename",
          "os.remove", "os.mkdir", "os.chdir", "os.symlink", "os.link"}
_state = {"fd": None, "seen": 0, "busy": False}


def _write(line: str) -> None:
    os.write(_state["fd"], (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))


def _hook(event: str, args) -> None:
    if _state["busy"] or (event not in EVENTS and event != "subprocess.Popen"):
        return
    _state["busy"] = True
    try:
        watched = args[:3] if event == "subprocess.Popen" else args  # program, arguments, cwd (not env)
        text = repr(watched)
        if FORBID and FORBID in text:
            _write(f"FORBIDDEN {event} {text[:500]}")
        elif event == "open" and OWN in text and _state["seen"] < 200:
            _state["seen"] += 1
            _write(f"SEEN {event} {text[:300]}")
    except Exception:  # noqa: BLE001 - an audit must never break the worker
        pass
    finally:
        _state["busy"] = False


def dask_setup(worker=None) -> None:  # called by `dask worker --preload`
    if _state["fd"] is not None or not os.environ.get("NOFS_AUDIT_DIR"):
        return
    path = os.path.join(os.environ["NOFS_AUDIT_DIR"], f"{os.getpid()}.log")
    _state["fd"] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _write(f"START pid={os.getpid()} cwd={os.getcwd()} worker={getattr(worker, 'name', None)}")
    sys.addaudithook(_hook)
