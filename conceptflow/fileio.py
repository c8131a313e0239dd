"""Atomic writes and content hashes.

Every artifact is written to a temporary file in its destination folder and renamed into
place, so a killed run never leaves a half-written file where a finished one is expected.
Hashes are DVC's: the md5 of a file's bytes, and for a folder the md5 of its sorted
(relative path, md5) listing.

A staging folder (``.<name>.<random>``, and ``.<name>.old.<random>`` for the folder it
replaces) carries an owner mark while it is built (``conceptflow.locks``); a killed build's
staging folder is found and removed by ``remove_dead_staging``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from conceptflow.locks import OWNER_MARK, mark_owner, owner_is_gone

CHUNK = 1 << 20
# tempfile.mkdtemp/mkstemp names: a prefix, 8 characters of [a-z0-9_], a suffix.
STAGING_DIR = re.compile(r"^\.(?P<destination>.+?)\.(?:old\.)?[a-z0-9_]{8}$")
STAGING_FILE = re.compile(r"^\.(?P<destination>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]*)?$")
UNMARKED_STALE_S = 600.0  # an unmarked staging folder this old is a killed build's


@contextmanager
def atomic_path(destination: Path, suffix: str = "", keep_name: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; rename it into place on success.

    ``keep_name``: the temporary file has ``destination``'s own name, inside a hidden staging
    folder beside it, for writers that record the file name in the file (``torch.save`` names
    its zip archive's top folder after the file's stem).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    if keep_name:
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
        temporary = staging / destination.name
    else:
        handle, name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=suffix or destination.suffix,
                                        dir=destination.parent)
        os.close(handle)
        temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(destination: Path, text: str) -> Path:
    with atomic_path(destination) as temporary:
        temporary.write_text(text)
    return Path(destination)


def write_json_atomic(destination: Path, payload) -> Path:
    return write_text_atomic(destination, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_directory(destination: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``destination``; swap it into place on success.

    ``keep_existing``: a ``destination`` that exists when the build finishes (a concurrent
    builder finished first) is kept and this build is discarded, instead of replacing it.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    owners = [mark_owner(staging)]  # held until the end: the folder is not a dead build's
    try:
        yield staging
        if not destination.exists():
            (staging / OWNER_MARK).unlink(missing_ok=True)
            try:
                os.replace(staging, destination)
            except OSError:  # another builder's folder arrived in between
                if not (keep_existing and destination.exists()):
                    raise
        elif not keep_existing:
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
            owners.append(mark_owner(retired))
            os.replace(destination, retired / "old")
            (staging / OWNER_MARK).unlink(missing_ok=True)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for descriptor in owners:
            os.close(descriptor)


def _is_dead_staging(folder: Path, unmarked_older_than_s: float) -> bool:
    gone = owner_is_gone(folder)
    if gone is None:  # no mark: killed before marking or after unmarking, or an atomic_path folder
        try:
            return time.time() - folder.stat().st_mtime >= unmarked_older_than_s
        except FileNotFoundError:
            return False
    return gone


def remove_dead_staging(parent: Path, destination_name: str | None = None,
                        unmarked_older_than_s: float = UNMARKED_STALE_S) -> list[Path]:
    """Remove the staging folders in ``parent`` (of ``destination_name`` only, if given) whose
    builder is gone: an owner mark nobody holds, or no mark and ``unmarked_older_than_s`` old.

    A folder being built (its mark held, by any process) is never removed. Returns the removed.
    """
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = STAGING_DIR.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        if destination_name is not None and match["destination"] != destination_name:
            continue
        if _is_dead_staging(entry, unmarked_older_than_s):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def remove_dead_staging_under(root: Path, unmarked_older_than_s: float = UNMARKED_STALE_S) -> list[Path]:
    """``remove_dead_staging`` in every folder under ``root``, plus ``atomic_path`` temporaries
    (``.<name>.<random><suffix>`` files) as old as ``unmarked_older_than_s``."""
    removed = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        gone = {path.name for path in remove_dead_staging(here, unmarked_older_than_s=unmarked_older_than_s)}
        removed += [here / name for name in sorted(gone)]
        subfolders[:] = [name for name in subfolders if name not in gone]
        for name in files:
            match = STAGING_FILE.match(name)
            if match is None or Path(match["destination"]).suffix != (match["suffix"] or ""):
                continue
            path = here / name
            try:
                if time.time() - path.stat().st_mtime >= unmarked_older_than_s:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def file_md5(path: str | Path) -> str:
    """The md5 of a file's bytes (the digest DVC records), read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_md5(path: Path) -> str:
    """md5 over the sorted (relative path, file md5) pairs of a folder (hidden files skipped)."""
    digest = hashlib.md5()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{file_md5(file)}\n".encode())
    return digest.hexdigest()


def content_md5(path: Path) -> str:
    path = Path(path)
    return directory_md5(path) if path.is_dir() else file_md5(path)
