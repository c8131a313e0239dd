"""The catalog flow: one task per stage and item of the stage table (conceptflow/stages/table.py),
each waiting for the items it reads; then the report, DVC record and MLflow registration.

With ``--no-shared-fs`` the item tasks are tasks/remote.py's: each runs in its Dask worker's own
clone and returns its output's record (path + md5s, conceptflow/remote_workspace.py), which the
tasks downstream take as inputs and this flow pulls into the project before the report."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prefect import flow
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner

from conceptflow.errors import ConceptflowError
from conceptflow.stages.status import up_to_date_items
from conceptflow.stages.table import STAGES, plan, stage, upstream_items
from conceptflow.validation import validate_catalog
from tasks.remote import REMOTE_STAGE_TASKS
from tasks.stages import STAGE_TASKS, catalog_at, manifest_summary, record_task, register_task

ITEM_STAGES = tuple(row for row in STAGES if row.fan_out != "catalog")
# The stages that put models on the catalog's device (ingest only reads and writes images).
DEVICE_STAGES = frozenset({"mask", "train", "fuse", "generate", "evaluate"})
GPU_RESOURCE = "GPU"


def item_resources(catalog, stage_name: str) -> dict[str, int]:
    """The Dask resources a stage item asks for: ``{"GPU": 1}`` for a device stage when the
    catalog's device is CUDA (only workers started with ``--resources GPU=<n>`` run it), else none."""
    if stage_name in DEVICE_STAGES and str(catalog.device).startswith("cuda"):
        return {GPU_RESOURCE: 1}
    return {}


@contextmanager
def _annotated(resources: dict[str, int]) -> Iterator[None]:
    """``dask.annotate(resources=...)`` around a submit (DaskTaskRunner's client.submit merges the
    annotations into the task); nothing, and no dask import, when no resource is asked."""
    if not resources:
        yield
        return
    import dask

    with dask.annotate(resources=resources):
        yield
CATALOG_STAGES = tuple(row for row in STAGES if row.fan_out == "catalog")


# One worker thread: diffusers/transformers loading patches torch module construction globally
# (accelerate's init_empty_weights), so two models built in two threads of one process corrupt
# each other, and torch already uses every core for one item. Parallel fan-out runs items in
# separate processes: `--runner dask`.
@flow(name="conceptflow-catalog", task_runner=ThreadPoolTaskRunner(max_workers=1))
def catalog_flow(catalog_path: str, sampler: str | None = None, workspace: dict | None = None) -> dict:
    """ingest -> mask -> train per concept; fuse -> generate -> evaluate per combination;
    then the report, record in DVC, register in MLflow. ``workspace`` (``--no-shared-fs``, a
    ``remote_workspace.Workspace``): each item runs in its worker's own clone, exchanging outputs
    through the DVC remote, and the outputs are pulled here before the report."""
    catalog = catalog_at(catalog_path)  # validated once here; thread-runner tasks reuse it
    validate_catalog(catalog, catalog_path)  # base, device, prompts, folders: before the first stage
    options = {"sampler": sampler}
    previous = _main_outputs(catalog, workspace) if workspace is not None else {}
    futures: dict[str, PrefectFuture] = {}
    jobs = plan(catalog, ITEM_STAGES)
    # Items already up to date, as their own stages would judge, get no task: a no-change rerun of
    # a large catalog otherwise spends its time on per-task bookkeeping (conceptflow/stages/status.py).
    # Without a shared filesystem the workers decide (the project's outputs may be elsewhere).
    skipped = up_to_date_items(catalog, jobs, options) if workspace is None else {}
    for row, item in jobs:
        upstream = [f"{name}:{upstream_item}" for name in row.upstream
                    for upstream_item in upstream_items(catalog, row, stage(name), item)]
        passed = {key: options[key] for key in row.options}
        label = f"{row.name}:{item}"
        if label in skipped:
            continue
        with _annotated(item_resources(catalog, row.name)):
            if workspace is None:
                futures[label] = STAGE_TASKS[row.name].submit(catalog_path, row.name, item, passed,
                                                              wait_for=[futures[name] for name in upstream
                                                                        if name in futures])
            else:  # the upstream results (their output records) are the task's inputs
                futures[label] = REMOTE_STAGE_TASKS[row.name].submit(
                    workspace, row.name, item, passed, inputs=[futures[name] for name in upstream],
                    previous=previous.get(label))
    wait(list(futures.values()))

    results = {label: manifest_summary(manifest, ran=False) for label, manifest in skipped.items()}
    failures = {}
    for label, future in futures.items():
        state = future.state
        if state.is_completed():
            results[label] = future.result()
        else:
            failures[label] = state.message or state.name
    if workspace is not None:  # the workers' outputs, md5-checked, into this project (finished ones also on failure)
        pull_outputs(catalog, workspace, [result["output"] for result in results.values()])
    if failures:
        # Finished items stay on disk with their manifests; the next run redoes only the rest.
        details = "; ".join(f"{label}: {message}" for label, message in failures.items())
        raise ConceptflowError(f"{len(failures)} task(s) did not finish ({details}). Fix the cause and run again: "
                               "finished concepts and combinations are kept and skipped.")

    # The catalog stages (the report) read every item's output: they run once all items finished.
    finals = {row.name: STAGE_TASKS[row.name](catalog_path, row.name, item)
              for row, item in plan(catalog, CATALOG_STAGES)}
    dvc = record_task(catalog_path)  # after the report: dvc.yaml tracks it too
    registered = register_task(catalog_path)  # after DVC: lineage tags read dvc.lock
    return {"stages": results, "dvc": dvc, "registered": registered, "report": finals["report"]}


def dask_task_runner(address: str | None = None):
    """A DaskTaskRunner: on the existing cluster at ``address`` (``tcp://HOST:PORT``; its workers
    must import conceptflow and, unless ``--no-shared-fs``, see the project's files), else a LocalCluster of two
    one-thread worker processes on this machine."""
    from prefect_dask import DaskTaskRunner

    if address:
        if "://" not in address:
            address = f"tcp://{address}"
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})


def _project_top(catalog) -> Path:
    from conceptflow.remote_workspace import git_toplevel

    top = git_toplevel(Path(catalog.root))
    if top is None:
        raise ConceptflowError(f"{catalog.root} is not in a git repository: --no-shared-fs workers clone the "
                               "project from git (git init && git add -A && git commit)")
    return top


def no_shared_fs_workspace(catalog_path: str, worker_root: str | None = None) -> dict:
    """The main side of ``--no-shared-fs``: the project's code (a git bundle of HEAD), the catalog
    file and the stage sources (photos) pushed to the project's default DVC remote."""
    from conceptflow.lineage import ensure_dvc_repo
    from conceptflow.remote_workspace import prepare_workspace, project_remote_url

    catalog = catalog_at(catalog_path)
    ensure_dvc_repo(catalog.root)
    remote = project_remote_url(catalog.root)
    if remote is None:
        raise ConceptflowError(f"{catalog.root}/.dvc/config names no default DVC remote the workers can reach: "
                               "`dvc remote add -d NAME URL` (a folder every worker sees, or s3://...)")
    sources = [path for row in STAGES if row.sources is not None for item in row.items(catalog)
               for path in row.sources(catalog, item)]
    workspace = prepare_workspace(_project_top(catalog), Path(catalog_path), remote, sources, worker_root,
                                  project=catalog.project)
    return workspace.as_dict()


def _main_outputs(catalog, workspace: dict) -> dict[str, dict]:
    """{"stage:item": record} of the outputs this project already holds, pushed to the remote."""
    from conceptflow.remote_workspace import Remote, push_existing

    folders = {f"{row.name}:{item}": row.folder(catalog, item) for row, item in plan(catalog, ITEM_STAGES)}
    return push_existing(_project_top(catalog), folders, Remote(workspace["remote"]))


def pull_outputs(catalog, workspace: dict, records: list[dict]) -> int:
    """Pull the workers' output ``records`` into this project (each md5-checked)."""
    from conceptflow.remote_workspace import Remote, pull_all

    return pull_all(_project_top(catalog), records, Remote(workspace["remote"]))


def run_catalog(catalog_path: str, sampler: str | None = None, runner: str = "threads",
                dask_address: str | None = None, no_shared_fs: bool = False,
                worker_root: str | None = None) -> dict:
    """Run the flow (ephemeral Prefect by default) and return a short summary. ``runner="dask"``
    fans items out to Dask workers: a LocalCluster, or the cluster at ``dask_address``;
    ``no_shared_fs``: those workers each work in their own clone under ``worker_root``."""
    if runner not in ("threads", "dask"):
        raise ConceptflowError(f"--runner must be 'threads' or 'dask', not {runner!r}")
    if dask_address and runner != "dask":
        raise ConceptflowError("--dask-address needs --runner dask")
    if no_shared_fs and not (runner == "dask" and dask_address):
        raise ConceptflowError("--no-shared-fs needs --runner dask --dask-address tcp://HOST:PORT (an existing "
                               "cluster: a LocalCluster's workers run in this project's folder)")
    if worker_root and not no_shared_fs:
        raise ConceptflowError("--worker-root needs --no-shared-fs")
    selected = catalog_flow
    if runner == "dask":
        selected = catalog_flow.with_options(task_runner=dask_task_runner(dask_address))
    workspace = no_shared_fs_workspace(catalog_path, worker_root) if no_shared_fs else None
    result = selected(catalog_path, sampler, workspace)
    ran = {label: r["ran"] for label, r in result["stages"].items()}
    return {"ran": [k for k, v in ran.items() if v], "up_to_date": [k for k, v in ran.items() if not v],
            "dvc_status_clean": result["dvc"]["clean"], "registered": result["registered"],
            "report": result["report"]["path"] + "/index.html",
            **({"workers": {label: r["worker"] for label, r in result["stages"].items()}} if no_shared_fs else {})}
