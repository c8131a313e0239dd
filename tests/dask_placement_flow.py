"""A small Prefect flow for tests/test_dask_cluster.py: where do tasks submitted under the catalog
flow's GPU annotation (flows.catalog._annotated(item_resources(...))) run on a Dask cluster?

Imported by the workers too (the test puts tests/ on their PYTHONPATH), so it is a module."""

from __future__ import annotations

import json

from prefect import flow, task
from prefect.cache_policies import NO_CACHE


@task(cache_policy=NO_CACHE)
def worker_name(index: int) -> str:
    import time

    from distributed import get_worker

    time.sleep(0.2)
    return get_worker().name


@flow
def _placement() -> dict:
    from conceptflow.config import Catalog
    from flows.catalog import _annotated, item_resources

    cuda = Catalog.model_construct(device="cuda")
    with _annotated(item_resources(cuda, "train")):
        gpu = [worker_name.submit(i) for i in range(4)]
    free = [worker_name.submit(10 + i) for i in range(4)]
    return {"gpu": [f.result() for f in gpu], "any": [f.result() for f in free]}


def placement(address: str) -> str:
    from prefect_dask import DaskTaskRunner

    return json.dumps(_placement.with_options(task_runner=DaskTaskRunner(address=address))())
