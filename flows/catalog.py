"""The catalog flow: the pipeline diagram, one task per stage and item."""

from __future__ import annotations

from prefect import flow
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner

from conceptflow.config import load_catalog
from conceptflow.errors import ConceptflowError
from tasks.stages import (
    evaluate_task,
    fuse_task,
    generate_task,
    ingest_task,
    mask_task,
    record_task,
    register_task,
    report_task,
    train_task,
)


# One worker thread: diffusers/transformers loading patches torch module construction globally
# (accelerate's init_empty_weights), so two models built in two threads of one process corrupt
# each other, and torch already uses every core for one item. Parallel fan-out runs items in
# separate processes: `--runner dask`.
@flow(name="conceptflow-catalog", task_runner=ThreadPoolTaskRunner(max_workers=1))
def catalog_flow(catalog_path: str, sampler: str | None = None) -> dict:
    """ingest -> mask -> train per concept; fuse -> generate -> evaluate per combination;
    then the report, record in DVC, register in MLflow."""
    catalog = load_catalog(catalog_path)
    futures: dict[str, PrefectFuture] = {}
    for concept in catalog.concepts:
        name = concept.name
        futures[f"ingest:{name}"] = ingest_task.submit(catalog_path, name)
        futures[f"mask:{name}"] = mask_task.submit(catalog_path, name, wait_for=[futures[f"ingest:{name}"]])
        futures[f"train:{name}"] = train_task.submit(catalog_path, name, wait_for=[futures[f"mask:{name}"]])
    for combination in catalog.combinations:
        name = combination.name
        trained = [futures[f"train:{c}"] for c in combination.concepts]
        futures[f"fuse:{name}"] = fuse_task.submit(catalog_path, name, wait_for=trained)
        futures[f"generate:{name}"] = generate_task.submit(catalog_path, name, sampler,
                                                           wait_for=[futures[f"fuse:{name}"]])
        futures[f"evaluate:{name}"] = evaluate_task.submit(catalog_path, name, wait_for=[futures[f"generate:{name}"]])
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

    report = report_task(catalog_path)
    dvc = record_task(catalog_path)  # after the report: dvc.yaml tracks it too
    registered = register_task(catalog_path)  # after DVC: lineage tags read dvc.lock
    return {"stages": results, "dvc": dvc, "registered": registered, "report": report}


def run_catalog(catalog_path: str, sampler: str | None = None, runner: str = "threads") -> dict:
    """Run the flow (ephemeral Prefect by default) and return a short summary."""
    selected = catalog_flow
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        selected = catalog_flow.with_options(
            task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True}))
    elif runner != "threads":
        raise ConceptflowError(f"--runner must be 'threads' or 'dask', not {runner!r}")
    result = selected(catalog_path, sampler)
    ran = {label: r["ran"] for label, r in result["stages"].items()}
    return {"ran": [k for k, v in ran.items() if v], "up_to_date": [k for k, v in ran.items() if not v],
            "dvc_status_clean": result["dvc"]["clean"], "registered": result["registered"],
            "report": result["report"]["path"] + "/index.html"}
