"""DVC and git: version the artifacts and say exactly which data made which model.

The pipeline stages run through the CLI, the Prefect flow or ``dvc repro``; in the first two
cases DVC did not run them, so after a run ``record_outputs`` does ``dvc commit`` (dvc.lock
then holds the outputs' md5s, ``dvc status`` is clean) and ``dvc push`` to the default remote
(a local folder unless configured). Lineage tags read the md5s back from dvc.lock. DVC runs
in subprocesses, one at a time (it holds one repository lock): ``dvc init`` through its CLI, the
calls every run makes (the default remote, commit, push, status) together in one process through
its Python API (``conceptflow.dvc_calls``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from conceptflow.errors import ConceptflowError


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dvc", *args]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise ConceptflowError(
            f"`dvc {' '.join(args)}` failed in {root}: {result.stderr.strip() or result.stdout.strip()}"
        )
    return result


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _init_dvc(root: Path) -> None:
    """``dvc init`` (inside git when there is one), once."""
    root = Path(root)
    if not (root / ".dvc").is_dir():
        in_git = _git(root, "rev-parse", "--show-toplevel") is not None
        _dvc(root, "init", *([] if in_git else ["--no-scm"]))
        _dvc(root, "config", "core.autostage", "false")


def ensure_dvc_repo(root: Path) -> None:
    """``dvc init`` (inside git when there is one) and a default local remote, once."""
    _init_dvc(root)
    _dvc_calls(root, "default-remote")


def _dvc_calls(root: Path, *calls: str) -> dict:
    """``conceptflow.dvc_calls``' results ({call: result}) of ``calls`` made in one DVC process."""
    result = subprocess.run([sys.executable, "-m", "conceptflow.dvc_calls", str(Path(root).resolve()), *calls],
                            cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConceptflowError(f"DVC failed in {root} ({' + '.join(calls)}): "
                               f"{result.stderr.strip() or result.stdout.strip()}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def record_outputs(root: Path, push: bool = True) -> bool:
    """Record every dvc.yaml stage's current outputs in dvc.lock (``dvc commit --force``), push them
    (``dvc push``) and return whether ``dvc status`` is then clean: one DVC process."""
    _init_dvc(root)
    results = _dvc_calls(root, "default-remote", "commit", *(["push"] if push else []), "status")
    return not results["status"]


def dvc_status_clean(root: Path) -> bool:
    """Whether ``dvc status`` finds every stage's outputs and dependencies as dvc.lock records them."""
    return not _dvc_calls(root, "status")["status"]


def locked_output_md5s(root: Path) -> dict[str, str]:
    """{output path: DVC md5} from dvc.lock (folders carry DVC's ``.dir`` md5)."""
    lock_path = Path(root) / "dvc.lock"
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    md5s = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            md5s[out["path"]] = out.get("md5", "")
    return md5s


def git_revision(root: Path) -> str:
    """HEAD's commit, with ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    revision = _git(root, "rev-parse", "HEAD")
    if revision is None:
        return "unknown"
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return f"{revision}-dirty" if dirty else revision
