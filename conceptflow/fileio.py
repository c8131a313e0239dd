"""Atomic writes and content hashes.

Every artifact is written to a temporary file in its destination folder and renamed into
place, so a killed run never leaves a half-written file where a finished one is expected.
Hashes are DVC's: the md5 of a file's bytes, and for a folder the md5 of its sorted
(relative path, md5) listing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHUNK = 1 << 20


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
    try:
        yield staging
        if not destination.exists():
            try:
                os.replace(staging, destination)
            except OSError:  # another builder's folder arrived in between
                if not (keep_existing and destination.exists()):
                    raise
        elif not keep_existing:
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
            os.replace(destination, retired / "old")
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
