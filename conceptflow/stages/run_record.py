"""The last complete run's record, and the no-change shortcut it allows.

A scheduled rerun of a catalog where nothing changed used to start the Prefect engine, check
every item, ``dvc commit``, ``dvc push``, ``dvc status`` and look every version up in MLflow, only
to find everything as the last run left it. After a complete run (every stage, the DVC record and
the registration finished) ``conceptflow run`` writes ``.conceptflow/last_run.json``: the run's
summary and a fingerprint of what it depended on. The next ``conceptflow run`` computes the same
fingerprint first and, when it is equal, prints the recorded summary (every item up to date,
nothing ran) without starting Prefect; ``conceptflow run --recheck`` always runs the flow, and so
does a run against a Prefect server (``PREFECT_API_URL``: there every run should show as a flow run).

The fingerprint holds, and the shortcut is taken only when all of these are as recorded:

* every stage item of the plan, the report included, up to date as its own stage would judge
  (``conceptflow.stages.status``: the item's manifest key from the stage table's config hash and
  its upstream md5s, its folder's content md5; the photos for ingest) and its manifest's md5;
* the catalog file's bytes and the sampler option;
* ``dvc.lock`` and ``.dvc/config`` (bytes): the record of the outputs and where they were pushed;
* the MLflow tracking URI, and for the default SQLite store the file's (and a write-ahead log's) size
  and modification time.

The same record lets registration skip the items it would find as they are
(``unchanged_registrations``): outputs with the recorded md5s, in a SQLite store untouched since.

Not covered (then use ``--recheck``): a DVC remote emptied by hand since the last run, and versions
deleted on an MLflow server (the flow's push and idempotent registration would restore both).
The record is written atomically, after the run's last step, so a killed run never leaves one
that claims more than what finished.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from conceptflow.config import Catalog
from conceptflow.fileio import write_json_atomic
from conceptflow.stages.status import up_to_date_items
from conceptflow.stages.table import STAGES, plan
from conceptflow.tracking import tracking_uri

RECORD_PATH = Path(".conceptflow") / "last_run.json"
FORMAT = 1


def _bytes_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def _registry_state(root: Path) -> dict:
    uri = tracking_uri(root)
    state: dict = {"uri": uri}
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        for key, path in (("file", database), ("wal", database.with_name(database.name + "-wal"))):
            stat = path.stat() if path.is_file() else None
            state[key] = [stat.st_size, stat.st_mtime_ns] if stat else "absent"
    return state


def project_fingerprint(catalog: Catalog, catalog_path: Path, sampler: str | None) -> dict | None:
    """What a complete run depended on, now; None when some stage item is not up to date (a run
    has work to do)."""
    jobs = plan(catalog)
    options = {"sampler": sampler}
    current = up_to_date_items(catalog, jobs, options)
    if len(current) != len(jobs):
        return None
    root = Path(catalog.root)
    return {"format": FORMAT,
            "items": {label: manifest.md5 for label, manifest in current.items()},
            "catalog": _bytes_md5(Path(catalog_path)), "sampler": sampler,
            "dvc_lock": _bytes_md5(root / "dvc.lock"), "dvc_config": _bytes_md5(root / ".dvc" / "config"),
            "registry": _registry_state(root)}


def write_run_record(catalog: Catalog, catalog_path: Path, sampler: str | None, summary: dict) -> dict | None:
    """After a complete run: record its summary with the fingerprint of the project as it left it
    (none when an item is, after all, not up to date: then nothing is recorded)."""
    fingerprint = project_fingerprint(catalog, catalog_path, sampler)
    path = Path(catalog.root) / RECORD_PATH
    if fingerprint is None:
        path.unlink(missing_ok=True)
        return None
    record = {"fingerprint": fingerprint, "summary": summary,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return record


def _read_record(catalog: Catalog) -> dict | None:
    try:
        record = json.loads((Path(catalog.root) / RECORD_PATH).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or (record.get("fingerprint") or {}).get("format") != FORMAT:
        return None
    return record


def catalog_as_recorded(catalog: Catalog, catalog_path: Path) -> bool:
    """Whether the catalog file has the bytes the last complete run read (cheap: no stage checked)."""
    record = _read_record(catalog)
    return record is not None and record["fingerprint"].get("catalog") == _bytes_md5(Path(catalog_path))


def unchanged_summary(catalog: Catalog, catalog_path: Path, sampler: str | None) -> dict | None:
    """The summary a run would print when nothing changed since the last complete run (every item
    up to date, nothing ran, the recorded DVC state and registered versions), else None."""
    record = _read_record(catalog)
    if record is None:
        return None
    fingerprint = project_fingerprint(catalog, catalog_path, sampler)
    if fingerprint is None or fingerprint != record["fingerprint"]:
        return None
    summary = dict(record["summary"])
    catalog_stages = {row.name for row in STAGES if row.fan_out == "catalog"}
    items = [label for label in fingerprint["items"] if label.partition(":")[0] not in catalog_stages]
    # Nothing moved this time: the versions as registered, without the last run's "(champion)" marks.
    registered = [line.removesuffix(" (champion)") for line in summary.get("registered", [])]
    summary.update(ran=[], up_to_date=items, registered=registered,
                   shortcut=f"nothing changed since the complete run of {record['finished']}: the flow was not "
                            "started (conceptflow run --recheck runs it)")
    summary.pop("workers", None)
    return summary


def unchanged_registrations(catalog: Catalog) -> dict[str, str]:
    """{registered model name: version} of the concepts and combinations whose stage outputs have the
    md5s the last complete run recorded, when the store is the default SQLite file and nothing has
    written to it since that run: registering them again would find every run and version as it is
    (registration is idempotent on content), so ``stages.register`` reuses the recorded versions instead
    of looking each one up. Empty for a tracking server (its state cannot be seen from here) or
    without a record. Call it after the stages ran: their manifests are then the outputs' md5s."""
    from conceptflow.registry import model_name
    from conceptflow.stages.base import read_manifest

    record = _read_record(catalog)
    if record is None:
        return {}
    fingerprint = record["fingerprint"]
    state = _registry_state(Path(catalog.root))
    if "file" not in state or state != fingerprint.get("registry"):
        return {}
    recorded = {}
    for line in record["summary"].get("registered", []):
        name, _, rest = line.partition(" v")
        recorded[name] = rest.split(" ")[0]
    items = fingerprint["items"]
    kinds = {"concept": ("concept", [c.name for c in catalog.concepts]),
             "combination": ("combo", [c.name for c in catalog.combinations])}
    unchanged = {}
    for fan_out, (kind, names) in kinds.items():
        rows = [row for row in STAGES if row.fan_out == fan_out]
        for item in names:
            registered = model_name(kind, item)
            manifests = [read_manifest(row.folder(catalog, item)) for row in rows]
            if registered in recorded and all(manifest is not None and items.get(f"{row.name}:{item}") == manifest.md5
                                              for row, manifest in zip(rows, manifests)):
                unchanged[registered] = recorded[registered]
    return unchanged
