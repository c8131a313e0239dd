"""The catalog flow: one task per stage and item of the stage table (conceptflow/stages/table.py),
each waiting for the items it reads; then the report, DVC record and MLflow registration."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from prefect import flow
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner

from conceptflow.errors import ConceptflowError
from conceptflow.stages.table import STAGES, plan, stage, upstream_items
from conceptflow.validation import validate_catalog
from tasks.stages import STAGE_TASKS, catalog_at, record_task, register_task

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
def catalog_flow(catalog_path: str, sampler: str | None = None) -> dict:
    """ingest -> mask -> train per concept; fuse -> generate -> evaluate per combination;
    then the report, record in DVC, register in MLflow."""
    catalog = catalog_at(catalog_path)  # validated once here; thread-runner tasks reuse it
    validate_catalog(catalog, catalog_path)  # base, device, prompts, folders: before the first stage
    options = {"sampler": sampler}
    futures: dict[str, PrefectFuture] = {}
    for row, item in plan(catalog, ITEM_STAGES):
        wait_for = [futures[f"{upstream}:{upstream_item}"] for upstream in row.upstream
                    for upstream_item in upstream_items(catalog, row, stage(upstream), item)]
        passed = {key: options[key] for key in row.options}
        with _annotated(item_resources(catalog, row.name)):
            futures[f"{row.name}:{item}"] = STAGE_TASKS[row.name].submit(catalog_path, row.name, item, passed,
                                                                         wait_for=wait_for)
    wait(list(futures.values()))

    results, failures = {}, {}
    for label, future in futures.items():
        state = future.state
        if state.is_completed():
            results[label] = future.result()
        else:
            failures[label] = state.message or state.name
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
    must import this checkout and see the project's files), else a LocalCluster of two
    one-thread worker processes on this machine."""
    from prefect_dask import DaskTaskRunner

    if address:
        if "://" not in address:
            address = f"tcp://{address}"
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})


def run_catalog(catalog_path: str, sampler: str | None = None, runner: str = "threads",
                dask_address: str | None = None) -> dict:
    """Run the flow (ephemeral Prefect by default) and return a short summary. ``runner="dask"``
    fans items out to Dask workers: a LocalCluster, or the cluster at ``dask_address``."""
    selected = catalog_flow
    if runner == "dask":
        selected = catalog_flow.with_options(task_runner=dask_task_runner(dask_address))
    elif runner != "threads":
        raise ConceptflowError(f"--runner must be 'threads' or 'dask', not {runner!r}")
    elif dask_address:
        raise ConceptflowError("--dask-address needs --runner dask")
    result = selected(catalog_path, sampler)
    ran = {label: r["ran"] for label, r in result["stages"].items()}
    return {"ran": [k for k, v in ran.items() if v], "up_to_date": [k for k, v in ran.items() if not v],
            "dvc_status_clean": result["dvc"]["clean"], "registered": result["registered"],
            "report": result["report"]["path"] + "/index.html"}
