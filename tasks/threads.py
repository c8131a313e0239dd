"""Torch threads on a Dask worker: the worker's share of its machine's cores, per task slot.

Torch uses every core of the machine by default, so N worker processes on N cores (or one
worker with several task threads) each start N threads and thrash (10-20x slower measured on
2 cores). On a Dask worker a stage task sets ``torch.set_num_threads(max(1, cores // slots))``
where ``slots`` is the worker's ``--nthreads`` and ``cores`` is, in order: the worker's
``cores`` resource (``dask worker --resources cores=8``), else this host's usable cores
(``os.sched_getaffinity``) divided among the workers the scheduler knows on this host.
Outside a Dask worker nothing changes. ``APPLIED`` records what was set (the test reads it).
"""

from __future__ import annotations

import os
import threading

APPLIED: dict[str, int] = {}  # {"threads": n, "tasks": tasks that asked} on this worker process
_LOCK = threading.Lock()


def _host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _workers_on_host(worker) -> int:
    """Workers the scheduler knows on this worker's host (this one included); 1 if it cannot say."""
    try:
        from distributed import get_client

        workers = get_client().scheduler_info(n_workers=-1)["workers"].values()
    except Exception:  # noqa: BLE001 - no scheduler answer: assume the worker is alone
        return 1
    return max(1, sum(1 for info in workers if info.get("host") == worker.ip))


def torch_threads_for_worker() -> int | None:
    """Set and return the torch threads of this Dask worker (None outside a worker). Computed once
    per worker process (later tasks reuse it)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    with _LOCK:
        if "threads" not in APPLIED:
            slots = max(1, int(worker.state.nthreads))
            cores = int(worker.state.total_resources.get("cores", 0)) or _host_cores() // _workers_on_host(worker)
            APPLIED["threads"] = max(1, cores // slots)
        APPLIED["tasks"] = APPLIED.get("tasks", 0) + 1
        threads = APPLIED["threads"]
    from conceptflow.torch_threads import use_torch_threads

    return use_torch_threads(threads)
