"""Inter-process locks on the filesystem: the project's run lock and staging folders' owner marks.

Both are ``fcntl.flock`` locks, which the kernel releases when the holding process dies (also
by ``kill -9``), so a lock is never left stale and no pid has to be trusted.

- The **run lock** ``<project>/.conceptflow/run.lock``: ``conceptflow run`` and the single-stage
  commands hold it for their whole length, so two of them on one project never work side by
  side. A second one waits (printing "waiting for the run holding <lockfile> (pid N)"), or
  gives up with a ``RunLockBusy`` after a timeout (0: refuse at once). The file holds the
  holder's pid and command line, for that message only; it stays in place when released.
- An **owner mark** ``.owner.lock`` inside a staging folder (``fileio.atomic_directory``): held
  while the folder is being built. A staging folder whose mark can be locked belongs to a
  process that is gone and may be removed (``owner_is_gone``).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from conceptflow.errors import ConceptflowError

RUN_LOCK = Path(".conceptflow") / "run.lock"
OWNER_MARK = ".owner.lock"
POLL_S = 0.5


class RunLockBusy(ConceptflowError):
    """Another conceptflow process holds the project's run lock."""


def _try_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "pid unknown"
    pid, _, command = text.partition(" ")
    return f"pid {pid}" + (f": {command}" if command else "") if pid else "pid unknown"


def run_lock_path(project_root: Path) -> Path:
    return Path(project_root).resolve() / RUN_LOCK


@contextmanager
def run_lock(project_root: Path, timeout_s: float | None = None,
             say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the project's run lock for the block; yield the lock file's path.

    ``timeout_s``: None waits as long as it takes, 0 refuses at once when the lock is held,
    otherwise waits that many seconds and then raises ``RunLockBusy``. ``say`` receives the
    one waiting message (default: stderr).
    """
    path = run_lock_path(project_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not _try_lock(descriptor):
            holder = _holder(path)
            if timeout_s is not None and timeout_s <= 0:
                raise RunLockBusy(f"another conceptflow process ({holder}) holds {path}: wait for it to finish, "
                                  "or wait for it with a lock timeout (--wait-timeout / CONCEPTFLOW_LOCK_TIMEOUT)")
            (say or (lambda text: print(text, file=sys.stderr, flush=True)))(
                f"waiting for the run holding {path} ({holder})")
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not _try_lock(descriptor):
                if deadline is not None and time.monotonic() >= deadline:
                    raise RunLockBusy(f"gave up after {timeout_s:g} s waiting for the run holding {path} "
                                      f"({_holder(path)}); run again when it has finished")
                time.sleep(POLL_S)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {' '.join(sys.argv)}\n".encode(), 0)
        yield path
    finally:
        os.close(descriptor)  # releases the lock


def lock_timeout_from_env(default: float | None = None) -> float | None:
    """``CONCEPTFLOW_LOCK_TIMEOUT`` in seconds (empty or unset: ``default``; 0: refuse at once)."""
    value = os.environ.get("CONCEPTFLOW_LOCK_TIMEOUT", "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ConceptflowError(f"CONCEPTFLOW_LOCK_TIMEOUT={value!r} is not a number of seconds") from None


# ---------------------------------------------------------------- staging folders' owner marks


def mark_owner(folder: Path) -> int:
    """Create and lock ``folder/.owner.lock`` (holding this pid); return the descriptor to close."""
    descriptor = os.open(Path(folder) / OWNER_MARK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if not _try_lock(descriptor):  # a fresh folder of our own: cannot happen
        os.close(descriptor)
        raise RuntimeError(f"{folder} is already owned")
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


def owner_is_gone(folder: Path) -> bool | None:
    """True when ``folder``'s owner mark can be locked (its owner died), False when it is held,
    None when the folder has no mark."""
    try:
        descriptor = os.open(Path(folder) / OWNER_MARK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    try:
        return _try_lock(descriptor)
    finally:
        os.close(descriptor)
