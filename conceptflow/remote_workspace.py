"""Workers that share no filesystem: stage inputs and outputs move through the DVC remote by md5.

With ``conceptflow run --runner dask --no-shared-fs`` every Dask worker works in its own clone of
the project (``--worker-root``); what the workers share is the DVC remote (a local folder, or
S3 and the other DVC remotes), the MLflow server and the Prefect server. Tasks hand each other
**records**, small dicts naming an artifact by its project-relative path and its md5s::

    {"path": "data/adapters/dog", "kind": "dir", "dvc_md5": "<md5>.dir", "md5": "<directory_md5>",
     "files": 4}

``push`` writes an artifact to the remote in DVC 3's cache layout (``files/md5/<2 hex>/<30 hex>``
per file, and a folder's listing as the ``<md5>.dir`` object), the same objects and names
``dvc push`` writes, so the main project's later ``dvc push`` finds them there and ``dvc pull``
on any clone can read them. ``pull`` copies a record's files from the remote into a clone,
checking each file's md5 and then the folder's, and replaces the folder only when its content
differs. Paths in records are relative to the project (the git checkout's top folder), so a
record means the same on every worker.

``Workspace`` is what the flow gives each task: the remote, the project's code as a git bundle
stored in the remote by md5 (``bundle_project``), the catalog file's record, the stage sources'
records (photos) and the worker root. ``worker_clone`` makes or updates the worker's clone from
it (``git clone`` of the bundle, then the recorded revision checked out) and writes the catalog
and sources into it. No Prefect here: tasks/remote.py calls these.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from conceptflow.errors import ConceptflowError
from conceptflow.fileio import atomic_directory, atomic_path, directory_md5, file_md5

OBJECTS = Path("files") / "md5"  # DVC 3's cache layout inside a remote
CLONE_LOCK = ".conceptflow-clone.lock"
DEFAULT_WORKER_ROOT = "conceptflow-worker"  # relative: under each worker's working folder


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "worker"


# --------------------------------------------------------------------------------------------- remote


class Remote:
    """A DVC remote's object store: a local folder, or a URL DVC has a filesystem for (s3://...).
    ``via_dvc``: reach a local folder through DVC's filesystem too (the code path of s3://)."""

    def __init__(self, url: str | Path, via_dvc: bool = False):
        self.url = str(url)
        if via_dvc or ("://" in self.url and not self.url.startswith("file://")):
            self._fs, self._base = _cloud_fs(self.url)
        else:
            self._fs, self._base = None, Path(self.url.removeprefix("file://")).resolve()

    def _where(self, oid: str):
        relative = f"{OBJECTS.as_posix()}/{oid[:2]}/{oid[2:]}"
        return self._base / relative if self._fs is None else f"{self._base.rstrip('/')}/{relative}"

    def has(self, oid: str) -> bool:
        where = self._where(oid)
        return where.is_file() if self._fs is None else self._fs.exists(where)

    def put_file(self, local: Path, oid: str) -> None:
        """Store ``local`` as object ``oid`` (skipped when the remote has it: objects are immutable)."""
        if self.has(oid):
            return
        where = self._where(oid)
        if self._fs is not None:
            self._fs.makedirs(where.rsplit("/", 1)[0], exist_ok=True)
            self._fs.put_file(str(local), where)
            return
        with atomic_path(where, suffix=".tmp") as temporary:  # a reader never sees half an object
            shutil.copyfile(local, temporary)
            os.chmod(temporary, 0o444)  # DVC's objects are read-only

    def put_bytes(self, data: bytes, oid: str) -> None:
        if self.has(oid):
            return
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "object"
            path.write_bytes(data)
            self.put_file(path, oid)

    def get_file(self, oid: str, local: Path) -> Path:
        """Copy object ``oid`` to ``local``, refusing it unless its bytes hash to ``oid``."""
        if not self.has(oid):
            raise ConceptflowError(f"the DVC remote {self.url} holds no object {oid} ({self._where(oid)}): "
                                   "the task that made it did not push it, or the remote was cleaned; rerun")
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        if self._fs is None:
            shutil.copyfile(self._where(oid), local)
        else:
            self._fs.get_file(self._where(oid), str(local))
        os.chmod(local, 0o644)
        got = file_md5(local)
        if got != oid.removesuffix(".dir"):
            local.unlink(missing_ok=True)
            raise ConceptflowError(f"DVC object {oid} in {self.url} is corrupt (its bytes hash to {got}): "
                                   "delete it from the remote and rerun the stage that made it")
        return local

    def read_bytes(self, oid: str) -> bytes:
        with tempfile.TemporaryDirectory() as scratch:
            return self.get_file(oid, Path(scratch) / "object").read_bytes()


def _cloud_fs(url: str):
    """DVC's own filesystem for a remote URL (s3://, gs://, azure://, ssh://...; its plugin installed)."""
    try:
        from dvc.fs import get_cloud_fs

        cls, config, fs_path = get_cloud_fs({}, url=url)
        return cls(**config), fs_path
    except ImportError as error:
        raise ConceptflowError(f"no DVC filesystem for the remote {url}: install its DVC plugin "
                               f"(e.g. `pip install dvc-s3`): {error}") from error


# --------------------------------------------------------------------------------------------- push / pull


def _listing(folder: Path) -> list[dict[str, str]]:
    """DVC's ``.dir`` listing of ``folder``: every file (hidden ones too), sorted by relative path."""
    files = sorted((file.relative_to(folder).as_posix(), file) for file in Path(folder).rglob("*") if file.is_file())
    return [{"md5": file_md5(file), "relpath": relative} for relative, file in files]


def _listing_bytes(listing: list[dict[str, str]]) -> bytes:
    return json.dumps(listing, sort_keys=True).encode("utf-8")  # as dvc_data's Tree.as_bytes writes it


def relative_to_project(root: Path, path: Path) -> str:
    """``path`` relative to the project ``root``; a path outside it cannot travel to a worker."""
    try:
        return Path(os.path.abspath(path)).relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        raise ConceptflowError(f"{path} is outside the project {root}: with --no-shared-fs every input and "
                               "output must live in the project (workers have only their own clone of it); "
                               "move it into the project and use a relative path in the catalog") from None


def push(root: Path, path: Path | str, remote: Remote) -> dict:
    """Store the file or folder ``path`` (inside project ``root``) in ``remote``; return its record."""
    root = Path(root).resolve()
    absolute = Path(path) if Path(path).is_absolute() else root / path
    relative = relative_to_project(root, absolute)
    if absolute.is_file():
        oid = file_md5(absolute)
        remote.put_file(absolute, oid)
        return {"path": relative, "kind": "file", "dvc_md5": oid, "md5": oid, "files": 1}
    if not absolute.is_dir():
        raise ConceptflowError(f"cannot push {absolute}: no such file or folder")
    listing = _listing(absolute)
    for entry in listing:
        remote.put_file(absolute / entry["relpath"], entry["md5"])
    data = _listing_bytes(listing)
    oid = hashlib.md5(data).hexdigest() + ".dir"
    remote.put_bytes(data, oid)  # last: a listing in the remote means its files are there
    return {"path": relative, "kind": "dir", "dvc_md5": oid, "md5": directory_md5(absolute), "files": len(listing)}


def _local_matches(target: Path, record: dict) -> bool:
    if record["kind"] == "file":
        return target.is_file() and file_md5(target) == record["dvc_md5"]
    if not target.is_dir():
        return False
    return hashlib.md5(_listing_bytes(_listing(target))).hexdigest() + ".dir" == record["dvc_md5"]


def pull(root: Path, record: dict, remote: Remote) -> bool:
    """Make ``record``'s artifact exist at its path under project ``root``, byte for byte what was
    pushed (each file's md5 checked, then the folder's). Returns False when it was there already."""
    root = Path(root).resolve()
    target = root / record["path"]
    relative_to_project(root, target)  # a record naming ../x is refused
    if _local_matches(target, record):
        return False
    if record["kind"] == "file":
        with atomic_path(target) as temporary:
            remote.get_file(record["dvc_md5"], temporary)
        return True
    listing = json.loads(remote.read_bytes(record["dvc_md5"]))
    with atomic_directory(target) as staging:
        for entry in listing:
            relative = Path(entry["relpath"])
            if relative.is_absolute() or ".." in relative.parts:
                raise ConceptflowError(f"DVC listing {record['dvc_md5']} names {relative}, outside its folder")
            remote.get_file(entry["md5"], staging / relative)
        got = directory_md5(staging)
        if record.get("md5") and got != record["md5"]:
            raise ConceptflowError(f"{record['path']} pulled from {remote.url} hashes to {got}, not the recorded "
                                   f"{record['md5']}: the remote's listing {record['dvc_md5']} is not that artifact")
    return True


# --------------------------------------------------------------------------------------------- project


def git_toplevel(path: Path) -> Path | None:
    result = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
    return Path(result.stdout.strip()).resolve() if result.returncode == 0 else None


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConceptflowError(f"`git {' '.join(args)}` failed in {cwd}: {result.stderr.strip()}")
    return result.stdout.strip()


@dataclass
class Workspace:
    """What a no-shared-fs task needs to build its clone; plain data (it travels to the workers)."""

    remote: str  # the DVC remote's URL or local folder, as every worker reaches it
    project: str  # the project's name (the clone's folder name)
    revision: str  # the git commit the clones check out
    bundle: str  # md5 of the git bundle (in the remote) holding that commit
    catalog: dict  # the catalog file's record (its working-copy content: edits need no commit)
    sources: dict[str, dict] = field(default_factory=dict)  # project-relative path -> record (photos)
    worker_root: str = DEFAULT_WORKER_ROOT  # relative: under the worker process's working folder

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Workspace":
        return cls(**values)


def bundle_project(root: Path, remote: Remote) -> tuple[str, str]:
    """Store a git bundle of the project's HEAD in ``remote``; return (commit, bundle md5)."""
    revision = _git(root, "rev-parse", "HEAD")
    with tempfile.TemporaryDirectory() as scratch:
        bundle = Path(scratch) / "project.bundle"
        _git(root, "bundle", "create", "--quiet", str(bundle), "HEAD")
        oid = file_md5(bundle)
        remote.put_file(bundle, oid)
    return revision, oid


def prepare_workspace(root: Path, catalog_file: Path, remote_url: str, sources: list[Path],
                      worker_root: str | None = None, project: str | None = None) -> Workspace:
    """The main side: bundle the code, push the catalog file and the stage sources (photos)."""
    top = git_toplevel(Path(root))
    if top is None:
        raise ConceptflowError(f"{root} is not in a git repository: --no-shared-fs workers clone the project "
                               "from git (git init && git add -A && git commit)")
    remote = Remote(remote_url)
    revision, bundle = bundle_project(top, remote)
    catalog = push(top, catalog_file, remote)
    pushed = {}
    for source in sources:
        record = push(top, source, remote)
        pushed[record["path"]] = record
    return Workspace(remote=remote.url if "://" in remote.url else str(Path(remote.url).resolve()),
                     project=project or top.name, revision=revision, bundle=bundle, catalog=catalog,
                     sources=pushed, worker_root=worker_root or DEFAULT_WORKER_ROOT)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clone_folder(workspace: Workspace, worker_name: str) -> Path:
    """Where this worker's clone lives: ``<worker root>/<worker>/<project>`` (a relative root is
    taken from the worker process's working folder)."""
    return (Path(workspace.worker_root).expanduser() / _safe(worker_name) / _safe(workspace.project)).resolve()


def worker_clone(workspace: Workspace, worker_name: str) -> Path:
    """This worker's clone at the workspace's revision, with its catalog file and sources; made on
    first use (``git clone`` of the bundle), updated in place after (fetch + checkout)."""
    remote = Remote(workspace.remote)
    clone = clone_folder(workspace, worker_name)
    with _locked(clone.parent / f"{clone.name}{CLONE_LOCK}"):
        if not (clone / ".git").is_dir() or _git(clone, "rev-parse", "HEAD") != workspace.revision:
            with tempfile.TemporaryDirectory() as scratch:
                bundle = remote.get_file(workspace.bundle, Path(scratch) / "project.bundle")
                if not (clone / ".git").is_dir():
                    shutil.rmtree(clone, ignore_errors=True)
                    clone.parent.mkdir(parents=True, exist_ok=True)
                    _git(clone.parent, "clone", "--quiet", "--no-checkout", str(bundle), str(clone))
                else:
                    _git(clone, "fetch", "--quiet", str(bundle), "HEAD")
                _git(clone, "-c", "advice.detachedHead=false", "checkout", "--quiet", "--force", workspace.revision)
        pull(clone, workspace.catalog, remote)
    return clone


def pull_sources(clone: Path, workspace: Workspace, paths: list[Path]) -> None:
    """Pull the sources (photos) among ``paths`` that the main side pushed."""
    remote = Remote(workspace.remote)
    for path in paths:
        record = workspace.sources.get(relative_to_project(clone, path))
        if record is not None:
            pull(clone, record, remote)


# --------------------------------------------------------------------------------------------- main side


def project_remote_url(dvc_root: Path) -> str | None:
    """The URL (or absolute local folder) of the DVC project's default remote, or None."""
    import configparser

    dvc_dir = Path(dvc_root) / ".dvc"
    config = configparser.ConfigParser()
    config.read([dvc_dir / "config", dvc_dir / "config.local"])
    name = config.get("core", "remote", fallback=None)
    if not name:
        return None
    url = config.get(f'remote "{name}"', "url", fallback=None) or config.get(f"'remote \"{name}\"'", "url",
                                                                            fallback=None)
    if not url:
        return None
    if "://" in url:
        return url
    path = Path(url).expanduser()
    return str((path if path.is_absolute() else dvc_dir / path).resolve())


def push_existing(root: Path, folders: dict[str, Path], remote: Remote) -> dict[str, dict]:
    """{label: record} of the ``folders`` (label -> stage output) that exist, pushed to ``remote``:
    what the workers pull so that an item already up to date in the main project is skipped."""
    return {label: push(root, folder, remote) for label, folder in folders.items() if Path(folder).is_dir()}


def pull_all(root: Path, records: list[dict], remote: Remote) -> int:
    """Pull every record into project ``root``; returns how many changed there."""
    return sum(pull(root, record, remote) for record in records)
