"""What every stage does around its own work: skip when up to date, write atomically, record.

A stage output is a folder holding the artifact, ``stage.json`` (params, metrics, history:
what the registry logs) and ``.manifest.json`` (the Manifest: content hash, config hash and
upstream hashes). A stage whose folder already carries the manifest key it would produce,
with unchanged content, is skipped: that is how a second run with nothing changed redoes
nothing, whichever way it is started (CLI, Prefect flow or ``dvc repro``). Each stage takes
its folder, config hash and upstream md5s from the stage table (``stages/table.py``).

A stage builds in a staging folder beside its output (``fileio.atomic_directory``) and swaps it
into place at the end, so a killed stage leaves its old output (or none), never a partial one.
The staging folders of killed stages are removed when the stage next starts (only those whose
owner mark no process holds: a concurrent build is left alone), and by ``conceptflow run``
(``remove_dead_staging_in_project``, under the project's run lock).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from conceptflow import __version__
from conceptflow.fileio import (atomic_directory, directory_md5, remove_dead_staging, remove_dead_staging_under,
                                write_json_atomic)
from conceptflow.manifest import Manifest

MANIFEST_FILE = ".manifest.json"
RECORD_FILE = "stage.json"


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest in ``folder``, its ``path`` that folder (the file records no machine's path:
    an output made in another clone, pulled here, names where it is now)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return Manifest.load(path).model_copy(update={"path": Path(folder)})
    except ValueError:
        return None


def up_to_date(folder: Path, wanted: Manifest) -> Manifest | None:
    existing = read_manifest(folder)
    if existing is None or existing.key != wanted.key:
        return None
    return existing if directory_md5(folder) == existing.md5 else None


def run_stage(stage: str, name: str, folder: Path, config_hash: str, upstream: dict[str, str],
              produce: Callable[[Path], dict], force: bool = False) -> tuple[Manifest, bool]:
    """Run ``produce(staging_folder) -> record`` unless ``folder`` is up to date.

    Returns the manifest and whether the stage ran (False: skipped, nothing changed).
    """
    config_hash = f"{config_hash}:{__version__}"
    wanted = Manifest(stage=stage, name=name, path=folder, md5="", config_hash=config_hash, upstream=upstream)
    if not force:
        existing = up_to_date(folder, wanted)
        if existing is not None:
            return existing, False
    remove_dead_staging(Path(folder).parent, Path(folder).name)
    with atomic_directory(folder) as staging:
        record = produce(staging)
        record = {"stage": stage, "name": name, "config_hash": config_hash, "params": {}, "metrics": {},
                  "history": [], **record}
        write_json_atomic(staging / RECORD_FILE, record)
        manifest = wanted.model_copy(update={"md5": directory_md5(staging)})
        manifest.model_copy(update={"path": Path(".")}).save(staging / MANIFEST_FILE)  # same bytes in any clone
    return manifest, True


def remove_dead_staging_in_project(root: Path) -> list[Path]:
    """Remove every killed build's leftovers under the project's ``data/`` and ``.cache/``:
    staging folders whose owner mark nobody holds, and unmarked ones and ``atomic_path``
    temporaries of any age (and a half-built new MLflow store). Call it only holding the project's run lock
    (``conceptflow.locks.run_lock``): then no other conceptflow process writes there."""
    removed = []
    for top in ("data", ".cache"):
        removed += remove_dead_staging_under(Path(root) / top, unmarked_older_than_s=0.0)
    for temporary in Path(root).glob(".mlruns.db.*.db"):  # a new SQLite store's tables, being built
        temporary.unlink(missing_ok=True)
        removed.append(temporary)
    return removed


def require_manifest(folder: Path, what: str, command: str) -> Manifest:
    manifest = read_manifest(folder)
    if manifest is None:
        from conceptflow.errors import ConceptflowError

        raise ConceptflowError(f"{folder} has no {what}: run `conceptflow {command}` first")
    return manifest


def flat_params(prefix: str, values: dict) -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(f"{name}.", value))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = value
    return flat
