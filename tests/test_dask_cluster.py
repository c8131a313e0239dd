"""`conceptflow run --runner dask --dask-address` on an existing Dask cluster and a real Prefect server.

The cluster is started here as separate processes — `dask scheduler` and two `dask worker`s
with `--nthreads 1`, one declaring `--resources GPU=1` — and the Prefect API is a real
`prefect server` (flows/server.py). A tiny project (embedded:tiny-sd, two toy concepts trained
1 step, one combination, average fusion, the fused sampler at 1 step) runs through the CLI on
that cluster: every item runs on the workers (both take some), each worker set torch to
max(1, cores // workers on the host // 1) threads, the flow run is COMPLETED on the server, a
rerun redoes nothing. GPU placement: the catalog flow's `item_resources` asks `GPU=1` for
device stages of a CUDA catalog, and a flow submitting under that annotation runs only on the
GPU worker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "conceptflow.cli"]
DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
FIRST, SECOND = "zigzag_star", "quartered_heart"
COMBO = f"{FIRST}+{SECOND}"


def _env(api_url: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "PREFECT_API_URL": api_url,
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def prefect_api():
    from flows.server import prefect_server

    with prefect_server() as api_url:
        yield api_url


@pytest.fixture(scope="module")
def cluster(prefect_api, tmp_path_factory):
    """A scheduler and two one-thread workers (w-gpu declares GPU=1), each its own process."""
    from conceptflow.services import free_port

    logs = tmp_path_factory.mktemp("dask-logs")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = _env(prefect_api)
    processes = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                   "--port", str(port), "--no-dashboard"], env=env,
                                  stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT)]
    for name, extra in (("w-cpu", []), ("w-gpu", ["--resources", "GPU=1"])):
        processes.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--nworkers", "1", "--name", name, "--no-dashboard",
                                           *extra], env=env, cwd=logs,
                                          stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT))
    from distributed import Client

    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield {"address": address, "logs": logs}
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _worker_state(address: str) -> dict[str, dict]:
    from distributed import Client

    def state():
        import torch

        from tasks.threads import APPLIED
        return {**APPLIED, "torch_threads": torch.get_num_threads()}

    with Client(address, timeout=30) as client:
        by_address = client.run(state)
        names = {addr: info["name"] for addr, info in client.scheduler_info(n_workers=-1)["workers"].items()}
    return {names[addr]: value for addr, value in by_address.items()}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return toy_project(tmp_path_factory.mktemp("dask-project"))


def toy_project(project: Path) -> Path:
    """Two toy concepts (2 photos each, trained 1 step), one combination, in a fresh git repo."""
    concepts = {}
    for name, word in ((FIRST, "star"), (SECOND, "heart")):
        photos = project / "photos" / name
        photos.mkdir(parents=True)
        for stem in ("00", "01"):
            for suffix in (".png", ".txt"):
                shutil.copy(ROOT / "assets" / "toy-concepts" / name / f"{stem}{suffix}", photos)
        concepts[name] = {"class_word": word, "images": f"photos/{name}",
                          "train": {"method": "edlora", "steps": 1, "checkpoint_every": 1}}
    catalog = {"project": "dask-test", "base_model": "embedded:tiny-sd", "device": "cpu", "dtype": "float32",
               "resolution": 64, "seed": 0, "concepts": concepts,
               "combinations": {COMBO: {"concepts": [FIRST, SECOND], "prompts": [f"a <{FIRST}> and a <{SECOND}>"],
                                        "seeds": [0]}},
               "mask": {"backend": "auto"}, "fuse": {"method": "average"},
               "generate": {"sampler": "fused", "steps": 1, "batch_size": 1},
               "evaluate": {}}
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    (project / "catalog.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *command], cwd=project, check=True)
    return project


def _run(project: Path, api_url: str, address: str) -> dict:
    result = subprocess.run([*CLI, "run", "--catalog", "catalog.yaml", "--runner", "dask", "--dask-address", address],
                            cwd=project, env=_env(api_url), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_catalog_runs_on_an_existing_cluster_with_one_torch_thread_per_worker(project, prefect_api, cluster):
    started = time.time()
    summary = _run(project, prefect_api, cluster["address"])
    items = {f"{stage}:{name}" for stage in ("ingest", "mask", "train") for name in (FIRST, SECOND)}
    items |= {f"{stage}:{COMBO}" for stage in ("fuse", "generate", "evaluate")}
    assert set(summary["ran"]) == items and summary["dvc_status_clean"] is True
    assert (project / "data" / "adapters" / FIRST / "adapter.safetensors").is_file()

    workers = _worker_state(cluster["address"])
    assert set(workers) == {"w-cpu", "w-gpu"}
    assert sum(state.get("tasks", 0) for state in workers.values()) == len(items)
    cores = len(os.sched_getaffinity(0))
    for name, state in workers.items():
        assert state.get("tasks", 0) >= 1, f"{name} ran no task: {workers}"  # two concepts run side by side
        assert state["threads"] == state["torch_threads"] == max(1, cores // 2), workers

    import urllib.request

    request = urllib.request.Request(f"{prefect_api}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        runs = [run for run in json.loads(response.read()) if run["created"] >= time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(started - 5))]
    assert [run["state_type"] for run in runs] == ["COMPLETED"]

    again = _run(project, prefect_api, cluster["address"])
    assert again["ran"] == [] and set(again["up_to_date"]) == items


def test_device_stages_of_a_cuda_catalog_ask_for_a_gpu():
    from conceptflow.config import Catalog
    from flows.catalog import item_resources

    cuda = Catalog.model_construct(device="cuda:1")
    cpu = Catalog.model_construct(device="cpu")
    assert item_resources(cuda, "train") == {"GPU": 1} and item_resources(cuda, "generate") == {"GPU": 1}
    assert item_resources(cuda, "ingest") == {} and item_resources(cpu, "train") == {}


def test_gpu_annotated_items_run_only_on_gpu_workers(prefect_api, cluster, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    result = subprocess.run([sys.executable, "-c", (
        "import sys; sys.path[:0] = [sys.argv[1]];"
        "from dask_placement_flow import placement; print(placement(sys.argv[2]))"),
        str(ROOT / "tests"), cluster["address"]], env=_env(prefect_api), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    placed = json.loads(result.stdout.strip().splitlines()[-1])
    assert placed["gpu"] == ["w-gpu"] * 4
    assert set(placed["any"]) <= {"w-cpu", "w-gpu"} and len(placed["any"]) == 4
