"""Read a DVC remote folder directly by md5 (no DVC repository or ``dvc`` call needed).

A local DVC 3 remote stores each file under ``files/md5/<first 2 hex>/<other 30>`` and each
folder's listing (``<md5>.dir``: a JSON list of {"relpath", "md5"}) the same way; DVC 2
remotes lack the ``files/md5/`` prefix. ``project_remote`` finds a project's default remote
in its ``.dvc/config`` (``config.local`` wins), a relative url being relative to ``.dvc/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conceptflow.errors import ConceptflowError
from conceptflow.fileio import atomic_directory, file_md5
from conceptflow.remote_workspace import project_remote_url


def _object(remote: Path, md5: str) -> Path:
    for prefix in (Path("files") / "md5", Path()):
        candidate = Path(remote) / prefix / md5[:2] / md5[2:]
        if candidate.is_file():
            return candidate
    raise ConceptflowError(f"the DVC remote {remote} holds no object {md5}: was `dvc push` run after the pipeline?")


def folder_listing(remote: Path, md5: str) -> dict[str, str]:
    """{relative path: md5} of the folder DVC recorded as ``md5`` (``....dir``)."""
    if not md5.endswith(".dir"):
        raise ConceptflowError(f"DVC md5 {md5!r} names a file, not a folder (folder md5s end in .dir)")
    entries = json.loads(_object(remote, md5).read_text())
    return {entry["relpath"]: entry["md5"] for entry in entries}


def visible(listing: dict[str, str]) -> dict[str, str]:
    """The entries MLflow logs: hidden files (the stage manifest, temporaries) left out."""
    return {path: md5 for path, md5 in listing.items() if not any(part.startswith(".") for part in path.split("/"))}


def check_folder(folder: Path, remote: Path, md5: str) -> None:
    """Raise unless ``folder`` holds exactly the visible files of DVC folder ``md5``, byte for byte."""
    wanted = visible(folder_listing(remote, md5))
    present = {file.relative_to(folder).as_posix(): file_md5(file) for file in sorted(Path(folder).rglob("*"))
               if file.is_file()}
    present = visible(present)
    if present != wanted:
        differing = sorted(set(wanted.items()) ^ set(present.items()))[:3]
        raise ConceptflowError(f"{folder} differs from what DVC recorded as {md5} in {remote} (e.g. {differing}): "
                               "the registry's copy is not the versioned artifact")


def materialise(remote: Path, md5: str, destination: Path) -> Path:
    """Copy the visible files of DVC folder ``md5`` into ``destination`` (replaced), each md5-checked."""
    with atomic_directory(Path(destination)) as staging:
        for relative, file_hash in visible(folder_listing(remote, md5)).items():
            source = _object(remote, file_hash)
            if file_md5(source) != file_hash:
                raise ConceptflowError(f"DVC object {source} is corrupt (md5 differs from {file_hash})")
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return Path(destination)


def project_remote(project: Path) -> Path | None:
    """The local folder of ``project``'s default DVC remote, or None (none, or not a local path)."""
    url = project_remote_url(project)
    return None if url is None or "://" in url else Path(url)
