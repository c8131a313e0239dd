"""`conceptflow run --runner dask --dask-address ... --no-shared-fs`: workers that share no folder.

A `dask scheduler` and two `dask worker`s are started as separate processes (as in
tests/test_dask_cluster.py), each worker in its own temporary working folder. The project (the
same tiny toy catalog: two concepts trained 1 step, one combination) lives in a third folder;
the three share only the DVC remote (a fourth folder), and the Prefect server. Each worker
clones the project from a git bundle in the remote into ``<its cwd>/conceptflow-worker``, pulls
its inputs by md5, runs the stage in its clone and pushes the output.

Checked: the run finishes and runs every item, both workers take some; every output in the main
project is byte for byte (each file's md5) what the worker that made it holds in its clone, and
its DVC ``.dir`` md5 in dvc.lock is the listing the worker pushed (the remote holds it: same
objects as `dvc push` writes); no worker process touched a path under the main project (an audit
hook in each worker, tests/nofs_audit.py, sees Python's file events and subprocess cwd/args, and
does see the worker's own reads); a rerun after deleting both clones redoes nothing (workers pull
the main project's current outputs). The remote_workspace unit tests below need no cluster.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_dask_cluster import COMBO, FIRST, ROOT, SECOND, _env, toy_project

DVC = [sys.executable, "-m", "dvc"]
WORKERS = ("w-a", "w-b")


def _listing_md5(folder: Path) -> str:
    from conceptflow.remote_workspace import _listing, _listing_bytes

    return hashlib.md5(_listing_bytes(_listing(folder))).hexdigest() + ".dir"


def _files(folder: Path) -> dict[str, str]:
    from conceptflow.fileio import file_md5

    return {file.relative_to(folder).as_posix(): file_md5(file) for file in sorted(folder.rglob("*")) if file.is_file()}


# ------------------------------------------------------------------------------------- remote_workspace alone


def test_push_then_pull_gives_the_same_bytes_and_refuses_a_corrupt_object(tmp_path):
    from conceptflow.errors import ConceptflowError
    from conceptflow.remote_workspace import Remote, pull, push

    main, worker, remote = tmp_path / "main", tmp_path / "worker", Remote(tmp_path / "remote")
    folder = main / "data" / "adapters" / "dog"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter.safetensors").write_bytes(b"weights")
    (folder / ".manifest.json").write_text("{}")
    (folder / "sub" / "x.txt").write_text("x")
    record = push(main, folder, remote)
    assert record["path"] == "data/adapters/dog" and record["files"] == 3 and record["dvc_md5"].endswith(".dir")
    assert (tmp_path / "remote" / "files" / "md5" / record["dvc_md5"][:2] / record["dvc_md5"][2:]).is_file()

    assert pull(worker, record, remote) is True
    assert _files(worker / "data" / "adapters" / "dog") == _files(folder)
    assert pull(worker, record, remote) is False  # already there: nothing copied

    (worker / "data" / "adapters" / "dog" / "adapter.safetensors").write_bytes(b"changed")
    weights = next(e for e in json.loads(remote.read_bytes(record["dvc_md5"])) if e["relpath"] == "adapter.safetensors")
    stored = tmp_path / "remote" / "files" / "md5" / weights["md5"][:2] / weights["md5"][2:]
    stored.chmod(0o644)
    stored.write_bytes(b"rotten")
    with pytest.raises(ConceptflowError, match="corrupt"):
        pull(worker, record, remote)
    assert (worker / "data" / "adapters" / "dog" / "adapter.safetensors").read_bytes() == b"changed"  # not replaced

    with pytest.raises(ConceptflowError, match="outside the project"):
        push(main, tmp_path / "elsewhere", remote)
    with pytest.raises(ConceptflowError, match="outside the project"):
        pull(worker, {**record, "path": "../escaped"}, remote)


def test_a_remote_reached_through_dvcs_filesystem_holds_the_same_objects(tmp_path):
    """The s3:// code path (DVC's filesystem object) on a local folder: what it pushes the plain
    folder path pulls, and the reverse."""
    from conceptflow.remote_workspace import Remote, pull, push

    folder = tmp_path / "main" / "data" / "report"
    folder.mkdir(parents=True)
    (folder / "index.html").write_text("<html>")
    through_dvc, plain = Remote(tmp_path / "remote", via_dvc=True), Remote(tmp_path / "remote")
    assert through_dvc._fs is not None and plain._fs is None
    record = push(tmp_path / "main", folder, through_dvc)
    assert plain.has(record["dvc_md5"])
    assert pull(tmp_path / "worker", record, plain) is True
    assert pull(tmp_path / "other", record, through_dvc) is True
    assert _files(tmp_path / "worker" / "data" / "report") == _files(tmp_path / "other" / "data" / "report") == \
        _files(folder)


def test_a_worker_clone_follows_the_main_projects_commits_and_catalog_edits(tmp_path):
    from conceptflow.remote_workspace import prepare_workspace, pull_sources, worker_clone

    main = tmp_path / "main"
    (main / "photos" / "dog").mkdir(parents=True)
    (main / "photos" / "dog" / "00.png").write_bytes(b"png")
    (main / "catalog.yaml").write_text("project: p\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "one"]):
        subprocess.run([*git, *command], cwd=main, check=True)
    (main / "photos" / "cat").mkdir()
    (main / "photos" / "cat" / "00.png").write_bytes(b"untracked photo")
    remote, root = tmp_path / "remote", tmp_path / "worker-root"
    space = prepare_workspace(main, main / "catalog.yaml", str(remote), [main / "photos" / "cat"], str(root),
                              project="p")
    assert space.catalog["path"] == "catalog.yaml" and set(space.sources) == {"photos/cat"}
    clone = worker_clone(space, "tcp://10.0.0.1:4000")
    assert clone == (root / "tcp_10.0.0.1_4000" / "p").resolve() and (clone / "photos" / "dog" / "00.png").is_file()
    assert not (clone / "photos" / "cat").exists()  # not in git: it comes through the remote
    pull_sources(clone, space, [clone / "photos" / "cat"])
    assert (clone / "photos" / "cat" / "00.png").read_bytes() == b"untracked photo"

    (main / "catalog.yaml").write_text("project: p\nseed: 3\n")  # an edit not committed
    space = prepare_workspace(main, main / "catalog.yaml", str(remote), [], str(root), project="p")
    clone = worker_clone(space, "tcp://10.0.0.1:4000")
    assert (clone / "catalog.yaml").read_text() == "project: p\nseed: 3\n"
    (main / "new.txt").write_text("second commit")
    subprocess.run([*git, "add", "new.txt"], cwd=main, check=True)
    subprocess.run([*git, "commit", "-qm", "two"], cwd=main, check=True)
    space = prepare_workspace(main, main / "catalog.yaml", str(remote), [], str(root), project="p")
    clone = worker_clone(space, "tcp://10.0.0.1:4000")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    assert head == space.revision and (clone / "new.txt").read_text() == "second commit"
    assert (clone / "catalog.yaml").read_text() == "project: p\nseed: 3\n"


def test_pushed_objects_are_the_ones_dvc_push_writes(tmp_path):
    """The same folder through `dvc add` + `dvc push` and through remote_workspace.push: the same
    object files in both remotes, and the .dir md5 DVC recorded is the record's."""
    from conceptflow.remote_workspace import Remote, push

    project = tmp_path / "project"
    folder = project / "data" / "images"
    folder.mkdir(parents=True)
    for index in range(3):
        (folder / f"{index:02d}.png").write_bytes(bytes([index]) * (100 + index))
    (folder / ".manifest.json").write_text('{"md5": "x"}')
    for command in (["init", "--no-scm", "-q"], ["remote", "add", "-d", "r", str(tmp_path / "by-dvc")],
                    ["add", "-q", "data/images"], ["push", "-q"]):
        subprocess.run([*DVC, *command], cwd=project, check=True, capture_output=True)
    recorded = yaml.safe_load((project / "data" / "images.dvc").read_text())["outs"][0]["md5"]

    record = push(project, folder, Remote(tmp_path / "ours"))
    assert record["dvc_md5"] == recorded

    def objects(remote: Path) -> set[str]:
        return {path.relative_to(remote).as_posix() for path in remote.rglob("*") if path.is_file()}

    assert objects(tmp_path / "ours") == objects(tmp_path / "by-dvc") and len(objects(tmp_path / "ours")) == 5


# ------------------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="module")
def prefect_api():
    from flows.server import prefect_server

    with prefect_server() as api_url:
        yield api_url


@pytest.fixture(scope="module")
def nofs(tmp_path_factory) -> dict:
    """The main project (git + DVC with a default remote outside it) and the folders around it."""
    remote = tmp_path_factory.mktemp("nofs-remote")
    project = toy_project(tmp_path_factory.mktemp("nofs-project"))
    for command in (["init", "-q"], ["config", "core.autostage", "false"],
                    ["remote", "add", "-d", "shared", str(remote)]):
        subprocess.run([*DVC, *command], cwd=project, check=True, capture_output=True)
    for command in (["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "dvc"]):
        subprocess.run(["git", *command], cwd=project, check=True)
    return {"project": project, "remote": remote, "audit": tmp_path_factory.mktemp("nofs-audit"),
            "workers": {name: tmp_path_factory.mktemp(f"nofs-{name}") for name in WORKERS}}


@pytest.fixture(scope="module")
def cluster(prefect_api, nofs):
    from conceptflow.services import free_port

    logs = nofs["audit"]
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**_env(prefect_api), "NOFS_AUDIT_FORBID": str(nofs["project"].resolve()), "NOFS_AUDIT_DIR": str(logs)}
    processes = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                   "--port", str(port), "--no-dashboard"], env=env, cwd=logs,
                                  stdout=open(logs / "scheduler.out", "w"), stderr=subprocess.STDOUT)]
    for name, folder in nofs["workers"].items():
        processes.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--nworkers", "1", "--name", name, "--no-dashboard",
                                           "--preload", "nofs_audit", "--local-directory", str(folder / "scratch")],
                                          env=env, cwd=folder, stdout=open(logs / f"{name}.out", "w"),
                                          stderr=subprocess.STDOUT))
    from distributed import Client

    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _run(project: Path, api_url: str, address: str, log: Path) -> dict:
    result = subprocess.run([*CLI_RUN, "--dask-address", address], cwd=project, env=_env(api_url),
                            capture_output=True, text=True, timeout=900)
    log.write_text(f"{result.stdout}\n{result.stderr}")  # kept beside the workers' logs
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    return json.loads(result.stdout[result.stdout.index("{"):])


CLI_RUN = [sys.executable, "-m", "conceptflow.cli", "run", "--catalog", "catalog.yaml", "--runner", "dask",
           "--no-shared-fs"]


def test_catalog_runs_on_workers_sharing_only_the_dvc_remote(nofs, prefect_api, cluster):
    import shutil

    from conceptflow.config import load_catalog
    from conceptflow.stages.table import stage

    project = nofs["project"]
    started = time.time()
    summary = _run(project, prefect_api, cluster, nofs["audit"] / "run-1.out")
    first_run_s = time.time() - started
    items = {f"{name}:{item}" for name in ("ingest", "mask", "train") for item in (FIRST, SECOND)}
    items |= {f"{name}:{COMBO}" for name in ("fuse", "generate", "evaluate")}
    assert set(summary["ran"]) == items and summary["dvc_status_clean"] is True
    workers = summary["workers"]
    assert set(workers) == items and set(workers.values()) == set(WORKERS), workers  # both took some

    catalog = load_catalog(project / "catalog.yaml")
    locked = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    locked = {out["path"]: out["md5"] for entry in locked.values() for out in entry.get("outs", [])}
    for label, worker in workers.items():
        name, item = label.split(":")
        main_folder = stage(name).folder(catalog, item)
        relative = main_folder.relative_to(project).as_posix()
        clone = nofs["workers"][worker] / "conceptflow-worker" / worker / "dask-test"
        assert (clone / ".git").is_dir() and (clone / "catalog.yaml").is_file()
        made = _files(clone / relative)  # what the worker made, in its own clone
        assert made and made == _files(main_folder), label  # the main project holds exactly that
        assert json.loads((clone / relative / ".manifest.json").read_text())["path"] == "."  # no machine's path
        pushed = _listing_md5(main_folder)
        assert locked[relative] == pushed, label  # DVC's own md5 of the output is the listing the worker pushed
        assert (nofs["remote"] / "files" / "md5" / pushed[:2] / pushed[2:]).is_file()

    audits = [path.read_text().splitlines() for path in nofs["audit"].glob("*.log")]
    starts = [line for lines in audits for line in lines if line.startswith("START")]
    assert len(starts) == 2, starts  # one audited process per worker
    for lines in audits:
        seen = [line for line in lines if line.startswith("SEEN open") and "/data/" in line]
        assert seen, lines[:5]  # the hook does see the worker open its clone's stage files
        forbidden = [line for line in lines if line.startswith("FORBIDDEN")]
        assert not forbidden, forbidden[:5]

    for folder in nofs["workers"].values():  # fresh clones: the rerun pulls the main project's outputs
        shutil.rmtree(folder / "conceptflow-worker")
    started = time.time()
    again = _run(project, prefect_api, cluster, nofs["audit"] / "run-2.out")
    print(f"no-shared-fs run {first_run_s:.1f} s, rerun from fresh clones {time.time() - started:.1f} s")
    assert again["ran"] == [] and set(again["up_to_date"]) == items and again["dvc_status_clean"] is True


def test_no_shared_fs_needs_an_existing_cluster(tmp_path):
    from conceptflow.errors import ConceptflowError
    from flows.catalog import run_catalog

    with pytest.raises(ConceptflowError, match="--no-shared-fs needs --runner dask --dask-address"):
        run_catalog(str(tmp_path / "catalog.yaml"), runner="dask", no_shared_fs=True)
    with pytest.raises(ConceptflowError, match="--worker-root needs --no-shared-fs"):
        run_catalog(str(tmp_path / "catalog.yaml"), runner="dask", dask_address="tcp://127.0.0.1:1",
                    worker_root="x")


def test_photos_outside_the_project_are_refused_before_any_work(tmp_path):
    from conceptflow.errors import ConceptflowError
    from flows.catalog import run_catalog

    project, photos = tmp_path / "project", tmp_path / "photos-elsewhere"
    photos.mkdir()
    project.mkdir()
    catalog = {"project": "outside", "base_model": "embedded:tiny-sd", "device": "cpu",
               "concepts": {FIRST: {"class_word": "star", "images": str(photos)}}}
    (project / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "c"]):
        subprocess.run([*git, *command], cwd=project, check=True)
    with pytest.raises(ConceptflowError, match=f"{photos} is outside the project"):
        run_catalog(str(project / "catalog.yaml"), runner="dask", dask_address="tcp://127.0.0.1:1",
                    no_shared_fs=True)
