"""Faults with real processes: killed builds' staging folders, the project run lock, the MLflow
server down at register time, idempotent registration, and the same bytes from two processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conceptflow.fileio import remove_dead_staging, remove_dead_staging_under
from conceptflow.locks import OWNER_MARK
from conceptflow.stages.base import remove_dead_staging_in_project, run_stage

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "conceptflow.cli"]


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _wait_for(condition, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _builder(destination: Path) -> subprocess.Popen:
    """A real process building ``destination`` with atomic_directory, stuck half-way."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from conceptflow.fileio import atomic_directory
        with atomic_directory(Path({str(destination)!r})) as staging:
            (staging / "adapter.safetensors").write_bytes(b"half")
            time.sleep(600)
    """)
    return subprocess.Popen([sys.executable, "-c", code], env=_env())


def _staging_of(parent: Path, name: str) -> list[Path]:
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.is_dir())


def test_a_killed_stages_staging_is_removed_when_the_stage_next_starts_and_a_live_one_is_kept(tmp_path):
    adapters = tmp_path / "data" / "adapters"
    killed, live = _builder(adapters / "star"), _builder(adapters / "heart")
    try:
        _wait_for(lambda: len(_staging_of(adapters, "star")) == 1 and len(_staging_of(adapters, "heart")) == 1
                  and all((p / "adapter.safetensors").exists() for p in adapters.iterdir()), what="both builders")
        assert killed.poll() is None and live.poll() is None
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        dead = _staging_of(adapters, "star")[0]
        assert (dead / OWNER_MARK).exists()  # the mark stays; its lock went with the process

        manifest, ran = run_stage("train", "star", adapters / "star", "cfg", {},
                                  lambda staging: (staging / "adapter.safetensors").write_bytes(b"full") and {})
        assert ran and (adapters / "star" / "adapter.safetensors").read_bytes() == b"full"
        assert not (adapters / "star" / OWNER_MARK).exists()  # the mark never reaches the output
        assert _staging_of(adapters, "star") == []
        # the live build of another concept, in the same folder, is not touched by any sweep
        assert remove_dead_staging(adapters, unmarked_older_than_s=0) == []
        assert remove_dead_staging_in_project(tmp_path) == []
        assert len(_staging_of(adapters, "heart")) == 1
    finally:
        for process in (killed, live):
            process.kill()
            process.wait()
    # the live builder is killed now: its staging is a dead one too
    assert [p.name for p in remove_dead_staging_in_project(tmp_path)][0].startswith(".heart.")
    assert sorted(p.name for p in adapters.iterdir()) == ["star"]


def test_unmarked_leftovers_are_removed_by_age_and_by_the_run_sweep(tmp_path):
    data = tmp_path / "data" / "fused"
    retiree = data / ".dog+cat.old.ab12cd34"  # killed between retiring the old output and removing it
    (retiree / "old").mkdir(parents=True)
    temporary = data / "dog+cat" / "..manifest.json.x1y2z3w4.json"  # an atomic_path temporary
    temporary.parent.mkdir(parents=True)
    temporary.write_text("{")
    keep = [data / "dog+cat" / ".manifest.json", data / "dog+cat" / ".gitignore", data / ".hidden_folder"]
    keep[0].write_text("{}")
    keep[1].write_text("x")
    keep[2].mkdir()
    assert remove_dead_staging(data, "dog+cat") == []  # young and unmarked: maybe being finished
    old = time.time() - 3600
    os.utime(retiree, (old, old))
    assert remove_dead_staging(data, "other") == []  # only the stage's own name
    assert remove_dead_staging(data, "dog+cat") == [retiree]
    assert remove_dead_staging_under(tmp_path / "data", unmarked_older_than_s=0) == [temporary]
    assert all(path.exists() for path in keep)


# ---------------------------------------------------------------- the project run lock


HOLDER = """
import sys, time
from conceptflow.locks import run_lock
with run_lock(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def _tiny_project(root: Path) -> Path:
    import shutil

    import yaml

    photos = root / "photos" / "zigzag_star"
    photos.mkdir(parents=True)
    for stem in ("00", "01"):
        for suffix in (".png", ".txt"):
            shutil.copy(ROOT / "assets" / "toy-concepts" / "zigzag_star" / f"{stem}{suffix}", photos)
    catalog = {"project": "lock-test", "base_model": "embedded:tiny-sd", "device": "cpu", "resolution": 64,
               "concepts": {"zigzag_star": {"class_word": "star", "images": "photos/zigzag_star",
                                            "train": {"method": "edlora", "steps": 2}}},
               "combinations": {}, "mask": {"backend": "auto"}}
    (root / "catalog.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    return root


def test_a_second_command_on_a_locked_project_refuses_or_waits_and_runs_once_the_holder_is_killed(tmp_path):
    project = _tiny_project(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(project)], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        lock = project / ".conceptflow" / "run.lock"
        refused = subprocess.run([*CLI, "run", "--no-wait"], cwd=project, env=_env(), capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 2, refused.stderr
        assert f"(pid {holder.pid}" in refused.stderr and str(lock) in refused.stderr
        assert "Traceback" not in refused.stderr
        gave_up = subprocess.run([*CLI, "ingest"], cwd=project, env=_env(CONCEPTFLOW_LOCK_TIMEOUT="1"),
                                 capture_output=True, text=True, timeout=120)
        assert gave_up.returncode == 2 and "gave up after 1 s" in gave_up.stderr, gave_up.stderr
        assert f"waiting for the run holding {lock} (pid {holder.pid}" in gave_up.stderr
        assert not (project / "data" / "concepts").exists()  # nothing was done while locked

        waiter = subprocess.Popen([*CLI, "ingest"], cwd=project, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert "waiting for the run holding" in waiter.stderr.readline()
        time.sleep(1.0)
        assert waiter.poll() is None  # still waiting
        os.kill(holder.pid, signal.SIGKILL)  # the kernel releases a dead holder's flock
        holder.wait()
        out, err = waiter.communicate(timeout=300)
        assert waiter.returncode == 0, err
        assert "ingest" in out and "done" in out
        assert (project / "data" / "concepts" / "zigzag_star" / "images" / ".manifest.json").is_file()
        assert lock.read_text().split()[0] == str(waiter.pid)
    finally:
        for process in (holder, waiter):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


# ---------------------------------------------------------------- MLflow server down; idempotent registration


def _fake_adapter(root: Path, payload: bytes) -> Path:
    """A trained-concept folder as the train stage writes it (stage.json + the artifact)."""
    import json
    import uuid

    folder = root / f"adapter-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    (folder / "adapter.safetensors").write_bytes(payload)
    (folder / "stage.json").write_text(json.dumps({"stage": "train", "name": "dog", "config_hash": "cfg",
                                                   "params": {"rank": 4}, "metrics": {"loss": 0.5}, "history": []}))
    return folder


@pytest.fixture
def postgres_database():
    """A fresh PostgreSQL database of this test's own (trust auth), dropped afterwards."""
    import uuid

    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=3)
    except psycopg2.OperationalError as error:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {error}")
    admin.autocommit = True
    name = f"conceptflow_faults_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_server_down_at_register_time_fails_boundedly_naming_the_uri_and_a_rerun_registers_once(
        tmp_path, postgres_database, monkeypatch):
    from conceptflow import registry
    from conceptflow.errors import RegistryError
    from conceptflow.services import free_port
    from flows.server import mlflow_server

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # what the CLI sets (conceptflow.tool_env)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    lineage = {"dvc.images.md5": "1" * 32 + ".dir", "config_hash": "cfg", "git_revision": "abc",
               "base_model": "embedded:tiny-sd"}
    name, experiment = "concept.dog", "faults"

    def register(uri: str, folder: Path, score: float, **retries) -> tuple[str, bool]:
        def attempt():
            tags = {**lineage, registry.ARTIFACT_MD5: __import__("conceptflow.fileio").fileio.content_md5(folder)}
            run_id = registry.log_stage_run(uri, experiment, folder, tags)
            return registry.register_version(uri, name, run_id, tags, score)
        return registry.with_server_retries(uri, attempt, **retries)

    port, artifacts = free_port(), tmp_path / "artifacts"
    first = _fake_adapter(tmp_path, b"weights-1")
    with mlflow_server(postgres_database, artifacts, port=port) as (_, uri):
        assert register(uri, first, 0.5) == ("1", True)

    # the server is down: a few quick tries, then one error naming the URI and what to do
    started = time.monotonic()
    with pytest.raises(RegistryError) as raised:
        register(uri, first, 0.5, tries=3, backoff_s=1.0)
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert uri in message and "unreachable (3 tries" in message and "run again" in message
    assert 3.0 <= elapsed <= 30.0, elapsed  # waited 1 s + 2 s between the tries, bounded
    with pytest.raises(ValueError):  # any other error is not retried
        registry.with_server_retries(uri, lambda: (_ for _ in ()).throw(ValueError("bug")), tries=3, backoff_s=60)

    # back up: the rerun and a retrain giving the same bytes find version 1; a new content is v2
    with mlflow_server(postgres_database, artifacts, port=port) as (_, uri_again):
        assert uri_again == uri
        assert register(uri, first, 0.5) == ("1", False)
        retrained = _fake_adapter(tmp_path, b"weights-1")  # another folder, identical bytes
        assert register(uri, retrained, 0.5) == ("1", False)
        client = registry._client(uri)
        assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]

        # a registration killed after creating its version, before moving champion: the rerun
        # finds the version (no second one) and moves the alias as the first try would have
        better = _fake_adapter(tmp_path, b"weights-2")
        md5 = __import__("conceptflow.fileio").fileio.content_md5(better)
        run_id = registry.log_stage_run(uri, experiment, better, {**lineage, registry.ARTIFACT_MD5: md5})
        client.create_model_version(name, source=f"runs:/{run_id}/output", run_id=run_id,
                                    tags={**lineage, registry.ARTIFACT_MD5: md5, registry.SCORE: "0.9",
                                          registry.SCORE_HIGHER_IS_BETTER: "true"})
        assert registry.lookup(uri, name)["version"] == "1"
        assert register(uri, better, 0.9) == ("2", True)
        assert register(uri, better, 0.9) == ("2", False)
        assert registry.lookup(uri, name)["version"] == "2"
        assert sorted(v.version for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]


# ---------------------------------------------------------------- same content, same bytes

TRAIN_IN_PROCESS = """
import json, sys
from pathlib import Path
from conceptflow.config import load_catalog
from conceptflow.fileio import file_md5
from conceptflow.layout import Layout
from conceptflow.stages.ingest import ingest
from conceptflow.stages.mask import mask
from conceptflow.stages.train import train
catalog = load_catalog(Path(sys.argv[1]))
md5s = {}
for concept in catalog.concepts:
    ingest(catalog, concept.name)
    mask(catalog, concept.name)
    train(catalog, concept.name, force=True)
    md5s[concept.name] = file_md5(Layout(catalog).adapter(concept.name) / "adapter.safetensors")
print(json.dumps(md5s))
"""


def test_one_concept_trained_in_two_processes_cold_and_warm_cache_gives_the_same_adapter_bytes(tmp_path):
    """ED-LoRA and ConceptFlow-S (which builds embedded:tiny-clip) trained in a process whose
    embedded cache is empty, then again (--force) in another process with that cache warm."""
    import json

    import yaml

    project = _tiny_project(tmp_path / "project")
    catalog = yaml.safe_load((project / "catalog.yaml").read_text())
    catalog["concepts"]["quartered_heart"] = {"class_word": "heart", "images": "photos/quartered_heart",
                                              "train": {"method": "conceptflow_s", "steps": 2}}
    photos = project / "photos" / "quartered_heart"
    photos.mkdir(parents=True)
    for stem in ("00", "01"):
        for suffix in (".png", ".txt"):
            __import__("shutil").copy(ROOT / "assets" / "toy-concepts" / "quartered_heart" / f"{stem}{suffix}", photos)
    (project / "catalog.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    cache = tmp_path / "cold-cache"
    cache.mkdir()
    env = _env(CONCEPTFLOW_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    cold = subprocess.run([sys.executable, "-c", TRAIN_IN_PROCESS, str(project / "catalog.yaml")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert cold.returncode == 0, cold.stderr[-4000:]
    cold_md5s = json.loads(cold.stdout.strip().splitlines()[-1])
    assert any(cache.iterdir())  # the cache was built in that process
    warm = subprocess.run([*CLI, "train", "--force"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)
    assert warm.returncode == 0, warm.stderr[-4000:]
    from conceptflow.fileio import file_md5

    warm_md5s = {name: file_md5(project / "data" / "adapters" / name / "adapter.safetensors") for name in cold_md5s}
    assert set(cold_md5s) == {"zigzag_star", "quartered_heart"}
    assert warm_md5s == cold_md5s


def test_a_new_sqlite_store_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """A run killed while MLflow built a new SQLite store's tables left a half-built mlruns.db
    that every later run failed on (found by the kill trials): the tables are built aside."""
    from mlflow import MlflowClient

    from conceptflow import registry

    database = tmp_path / "mlruns.db"

    def killed(*args, **kwargs):
        assert not database.exists()  # nothing at the store's path while its tables are built
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(MlflowClient, "search_registered_models", killed)
    with pytest.raises(KeyboardInterrupt):
        registry._client(f"sqlite:///{database}")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    client = registry._client(f"sqlite:///{database}")
    assert database.is_file() and [p.name for p in tmp_path.iterdir()] == ["mlruns.db"]
    assert registry.experiment_id(client, "e") == client.get_experiment_by_name("e").experiment_id
    client.create_registered_model("concept.dog")
    assert [m.name for m in client.search_registered_models()] == ["concept.dog"]
