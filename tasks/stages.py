"""One Prefect task per stage of the stage table (conceptflow/stages/table.py), run per item;
tasks exchange manifests (paths + hashes), not tensors.

Caching is the stages' own: a stage whose output already carries the manifest key it would
produce (input hashes + config hash + code version) is skipped. Prefect's result cache is
off (NO_CACHE) because it cannot see an artifact deleted or changed on disk; the manifest
check can. Transient failures retry; user errors (ConceptflowError) do not.

Tasks take the catalog's path, not the catalog: a Dask worker is another process. Each process
validates a catalog file once (``catalog_at``): the flow and its thread-runner tasks share one
object, and each Dask worker loads it once.
"""

from __future__ import annotations

import threading
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from conceptflow.config import Catalog, load_catalog
from conceptflow.errors import ConceptflowError
from conceptflow.stages.table import STAGES, stage

_CATALOGS: dict[tuple[str, int, int], Catalog] = {}
_CATALOGS_LOCK = threading.Lock()
RETRIES = {"report": 0}  # default 1


def catalog_at(path: str) -> Catalog:
    """The validated catalog at ``path``, loaded once per process and file version (size, mtime)."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError:
        return load_catalog(path)  # raises the catalog's own "not found" error
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    with _CATALOGS_LOCK:
        if key not in _CATALOGS:
            _CATALOGS.clear()  # one catalog version at a time
            _CATALOGS[key] = load_catalog(resolved)
        return _CATALOGS[key]


def _retry_unless_user_error(task_definition, task_run, state) -> bool:
    try:
        state.result()
    except ConceptflowError:
        return False
    except Exception:
        return True
    return False


def _stage_task(name: str, retries: int = 1):
    return task(name=name, retries=retries, retry_delay_seconds=2, cache_policy=NO_CACHE,
                retry_condition_fn=_retry_unless_user_error, task_run_name=f"{name} {{item}}")


def manifest_summary(manifest, ran: bool) -> dict:
    """What the flow records of one item: its manifest and whether it ran."""
    return {"stage": manifest.stage, "name": manifest.name, "path": str(manifest.path), "md5": manifest.md5,
            "key": manifest.key, "ran": ran}


def _summary(result) -> dict:
    manifest, ran = result
    return manifest_summary(manifest, ran)


def run_stage_item(catalog_path: str, stage_name: str, item: str, options: dict | None = None) -> dict:
    """Run one stage for one item (skipped when up to date); returns its manifest summary. On a
    Dask worker torch first gets the worker's share of the cores (``tasks.threads``)."""
    from tasks.threads import torch_threads_for_worker

    torch_threads_for_worker()
    return _summary(stage(stage_name).call(catalog_at(catalog_path), item, **(options or {})))


# stage name -> its task: task(catalog_path, stage_name, item, options) (the name is passed again so
# that one function serves every stage and its runs read "train dog" in the Prefect UI).
STAGE_TASKS = {row.name: _stage_task(row.name, RETRIES.get(row.name, 1))(run_stage_item) for row in STAGES}


@_stage_task("dvc-record")
def record_task(catalog_path: str, item: str = "dvc") -> dict:
    """dvc commit + push of every stage output; returns the locked md5s."""
    from conceptflow.lineage import locked_output_md5s, record_outputs

    root = catalog_at(catalog_path).root
    clean = record_outputs(root)
    return {"clean": clean, "outputs": locked_output_md5s(root)}


@_stage_task("register")
def register_task(catalog_path: str, item: str = "mlflow") -> list[str]:
    """Log stages to MLflow and register versions with lineage."""
    from conceptflow.stages.register import register

    return register(catalog_at(catalog_path))
