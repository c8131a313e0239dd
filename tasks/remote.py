"""Stage tasks for workers that share no filesystem (``conceptflow run --runner dask --no-shared-fs``).

Each task runs in its worker's own clone of the project (conceptflow/remote_workspace.py): it
makes or updates the clone, pulls by md5 from the DVC remote what the stage reads (the photos
for ingest, the upstream tasks' outputs, and the main project's current output of this item,
so an up-to-date item is skipped on any worker), runs the stage there and pushes its output.
It returns the output's record (project-relative path and md5s), which the flow passes to the
tasks downstream and finally pulls into the main project.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from conceptflow.stages.table import STAGES, stage
from tasks.stages import RETRIES, _retry_unless_user_error, _summary, catalog_at


def worker_name() -> str:
    """The Dask worker's name (its clone's folder), or ``local`` outside a worker."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return "local"


def run_remote_item(workspace: dict, stage_name: str, item: str, options: dict | None = None,
                    inputs: list[dict] | None = None, previous: dict | None = None) -> dict:
    """Run one stage item in this worker's clone; ``inputs`` are the upstream tasks' results,
    ``previous`` the main project's record of this item's output (None: it has none)."""
    from conceptflow.remote_workspace import Remote, Workspace, pull, pull_sources, push, worker_clone
    from tasks.threads import torch_threads_for_worker

    torch_threads_for_worker()
    space = Workspace.from_dict(workspace)
    name = worker_name()
    clone = worker_clone(space, name)
    remote = Remote(space.remote)
    catalog = catalog_at(str(clone / space.catalog["path"]))
    row = stage(stage_name)
    if row.sources is not None:
        pull_sources(clone, space, list(row.sources(catalog, item)))
    for upstream in inputs or []:
        pull(clone, upstream["output"], remote)
    if previous is not None:
        pull(clone, previous, remote)
    manifest, ran = row.call(catalog, item, **(options or {}))
    output = push(clone, row.folder(catalog, item), remote)
    return {**_summary((manifest, ran)), "path": output["path"], "output": output, "worker": name,
            "clone": str(clone)}


def _remote_task(name: str, retries: int = 1):
    return task(name=name, retries=retries, retry_delay_seconds=2, cache_policy=NO_CACHE,
                retry_condition_fn=_retry_unless_user_error, task_run_name=f"{name} {{item}}")


# stage name -> task(workspace, stage_name, item, options, inputs, previous), as tasks.stages.STAGE_TASKS.
REMOTE_STAGE_TASKS = {row.name: _remote_task(row.name, RETRIES.get(row.name, 1))(run_remote_item)
                      for row in STAGES if row.fan_out != "catalog"}
