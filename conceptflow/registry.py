"""MLflow: one run per stage output, registered versions, the ``champion`` alias, lineage tags.

Names: ``concept.<name>`` for a trained concept, ``combo.<combination>`` for a fused model
(``combo.dog+cat``). MLflow forbids only '/' and ':' in registered-model names, and the
REST client percent-encodes '+', so names are used as they are, over SQLite and HTTP alike.

A stage output is a folder whose ``stage.json`` holds {"stage", "name", "params": flat,
"metrics": flat floats (null = not computed), "history": [{"step": int, metric: float}],
"config_hash"}; the rest of the folder (hidden files aside) is the artifact, logged under
``output/`` of the stage's run.

Every run and version carries the lineage the pipeline hands in (DVC md5s of the data, the
config hash, the git revision, the base model) plus ``artifact.md5``, the DVC md5 of the
stage output. That md5 makes logging idempotent: a stage output already logged, or a version
already registered, is found and returned instead of being added again.

A version's source is ``runs:/<id>/output`` (the stage folder) or, as the pipeline registers
them, ``runs:/<id>/pyfunc``: an MLflow pyfunc model of that folder (``log_model_folder``;
``conceptflow.serving.pyfunc``), so ``mlflow.pyfunc.load_model("models:/<name>@champion")``
works; ``download`` gives the stage folder either way.

``champion`` moves to a new version only when its score (a version tag) is no worse than the
current champion's; an unscored version takes the alias only when there is no champion yet or
the champion has no score either.

Registration is idempotent on content: a version whose ``artifact.md5`` (the adapter's or
fused model's DVC md5) is already registered is returned, so a rerun, or a retrain that gives
the same bytes, adds no version; a version registered by a run killed before it could move
``champion`` gets the alias on the rerun, as it would have. ``with_server_retries`` retries a
whole (idempotent) registration while the tracking server is unreachable: a few tries with
backoff (``CONCEPTFLOW_MLFLOW_TRIES``, default 3; ``CONCEPTFLOW_MLFLOW_BACKOFF_S``, default 2:
waits of 2 s, 4 s, ...), then a ``RegistryError`` naming the tracking URI.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project>/mlruns.db`` with
artifacts in ``<project>/mlartifacts``. ``flows.server.mlflow_server`` runs ``mlflow server``
on 127.0.0.1 for the server mode (e.g. on PostgreSQL).

MLflow decides on telemetry when it is imported, so the opt-out (MLFLOW_DISABLE_TELEMETRY) and
the quiet artifact transfers are set by the entry points (``conceptflow.tool_env``), not here.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from conceptflow.errors import ModelUnavailableError, RegistryError  # noqa: F401 - RegistryError is re-exported
from conceptflow.fileio import atomic_directory, content_md5
from conceptflow.stages.table import STAGE_NAMES
from conceptflow.tracking import normalise_database_uri, tracking_uri  # noqa: F401 - re-exported

STAGES = STAGE_NAMES  # the stage table's names (conceptflow/stages/table.py)
CHAMPION = "champion"
ARTIFACT_MD5 = "artifact.md5"
ARTIFACT_PATH = "output"  # where a run keeps its stage folder: runs:/<id>/output
PYFUNC_PATH = "pyfunc"  # where a run keeps its pyfunc model (conceptflow.serving.pyfunc): runs:/<id>/pyfunc
MODEL_LOGGED = "conceptflow.model_logged"  # run tag prefix: <prefix>.<artifact_path> = "true"
SCORE = "score"
SCORE_HIGHER_IS_BETTER = "score.higher_is_better"
ARTIFACTS_LOGGED = "conceptflow.artifacts_logged"
_BATCH = 100  # MLflow's per-request limit for params and tags (metrics allow 1000)


# ---------------------------------------------------------------- store


def _client(store: str | MlflowClient) -> MlflowClient:
    if isinstance(store, MlflowClient):
        return store
    uri = normalise_database_uri(store)
    if uri.startswith("sqlite:///"):
        _create_sqlite_store(Path(uri[len("sqlite:///"):]))
    return _client_for(uri)


@functools.lru_cache(maxsize=8)
def _client_for(uri: str) -> MlflowClient:
    """One client per store URI in a process (building one costs ~80 ms; registration makes dozens of calls)."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _create_sqlite_store(database: Path) -> None:
    """Create a missing SQLite store whole or not at all: MLflow builds its tables (tens of
    statements) on first use, and a process killed in between left a file that every later
    run failed on. The tables are built in a temporary file beside it and linked into place
    (a concurrent creator's finished file wins)."""
    if database.exists():
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{database.name}.", suffix=".db", dir=database.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        temporary.unlink()  # sqlite creates it
        uri = f"sqlite:///{temporary}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # builds the tracking tables
        client.search_registered_models(max_results=1)  # and the registry's
        try:
            os.link(temporary, database)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)


def _artifact_root(client: MlflowClient) -> str | None:
    """Artifacts beside a SQLite file (else the cwd would get ./mlruns); servers choose their own."""
    uri = client.tracking_uri
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        return (database.parent / "mlartifacts").resolve().as_uri()
    return None


def experiment_id(store: str | MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created on first use (safe against a concurrent creator)."""
    client = _client(store)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(client))
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def model_name(kind: str, name: str) -> str:
    """``concept.<name>`` or ``combo.<name>`` (a combination's name joins its concepts with '+')."""
    if kind not in ("concept", "combo"):
        raise RegistryError(f"registered-model kind must be 'concept' or 'combo', not {kind!r}")
    if not name or any(c in name for c in "/:'\"@"):
        raise RegistryError(f"{kind} name {name!r} cannot be a registered-model name: "
                            "rename it in the catalog without '/', ':', '@' or quotes")
    return f"{kind}.{name}"


# ---------------------------------------------------------------- runs


def read_stage(stage_dir: Path) -> dict:
    """Load and check a stage folder's ``stage.json`` (fields in the module docstring)."""
    path = Path(stage_dir) / "stage.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{path} is missing: every stage output folder must hold stage.json") from None
    except json.JSONDecodeError as error:
        raise RegistryError(f"{path} is not valid JSON ({error}); rerun the stage to rewrite it") from None
    if not isinstance(record.get("stage"), str) or not record["stage"]:
        raise RegistryError(f"{path}: field 'stage' must name the stage (e.g. one of {STAGES})")
    if not isinstance(record.get("name"), str) or not record["name"]:
        raise RegistryError(f"{path}: field 'name' must be the concept or combination name")
    for field in ("params", "metrics"):
        if not isinstance(record.get(field, {}), dict):
            raise RegistryError(f"{path}: field {field!r} must be a flat mapping")
    history = record.get("history", [])
    if not isinstance(history, list) or not all(isinstance(row, dict) and isinstance(row.get("step"), int)
                                                for row in history):
        raise RegistryError(f"{path}: field 'history' must be a list of {{'step': int, metric: value}}")
    return {"params": {}, "metrics": {}, "history": [], "config_hash": "", **record}


def _metric_value(path: Path, key: str, value) -> float | None:
    if value is None:  # a metric the stage could not compute: logged as absent, not as 0
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RegistryError(f"{path}: metric {key!r} is {value!r}, not a number; fix the stage that wrote it") from None


def _stage_metrics(record: dict, stage_json: Path, timestamp_ms: int) -> list[Metric]:
    """History as step metrics; final metrics at the last step, so MLflow shows them as latest.

    A final value replaces the history's value for the same metric at that step (one point each).
    """
    points: dict[tuple[str, int], float | None] = {}
    for row in record["history"]:
        step = int(row["step"])
        points.update({(key, step): _metric_value(stage_json, key, value) for key, value in row.items()
                       if key != "step"})
    last_step = max((step for _, step in points), default=0)
    points.update({(key, last_step): _metric_value(stage_json, key, value) for key, value in record["metrics"].items()})
    return [Metric(key, value, timestamp_ms, step) for (key, step), value in points.items() if value is not None]


def _find_run(client: MlflowClient, experiment: str, stage: str, name: str, md5: str):
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.stage = '{stage}' and tags.`{ARTIFACT_MD5}` = '{md5}' "
                      f"and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    # The name is compared here rather than in the filter: combination names may hold
    # characters the filter grammar would need escaped.
    return next((run for run in runs if run.data.tags.get("name") == name), None)


def _log_folder(client: MlflowClient, run_id: str, stage_dir: Path) -> None:
    """Log the stage folder under ``output/``; hidden files (atomic-write temporaries) stay out."""
    with tempfile.TemporaryDirectory(prefix="cf-mlflow-") as staging:
        for file in sorted(Path(stage_dir).rglob("*")):
            relative = file.relative_to(stage_dir)
            if file.is_file() and not any(part.startswith(".") for part in relative.parts):
                _link_or_copy(file, Path(staging) / relative)
        client.log_artifacts(run_id, staging, ARTIFACT_PATH)
    client.set_tag(run_id, ARTIFACTS_LOGGED, "true")


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # no second copy of a large adapter when /tmp shares the disk
    except OSError:
        shutil.copy2(source, target)


def log_stage_run(store: str | MlflowClient, experiment: str, stage_dir: Path, lineage: Mapping[str, str],
                  log_artifacts: bool = True) -> str:
    """Log one stage output as one MLflow run and return its id.

    Params, final metrics, the history as step metrics, tags (lineage, ``stage``, ``name``,
    ``artifact.md5``, ``config_hash`` from the lineage or else stage.json, whose own value is
    also kept as ``stage.config_hash``) and, if ``log_artifacts``, the folder under ``output/``.
    ``artifact.md5`` comes from ``lineage`` or is computed (DVC's folder md5). A finished run
    with the same stage, name and md5 is returned as it is (its artifacts added if it had none).
    """
    client = _client(store)
    stage_dir = Path(stage_dir)
    record = read_stage(stage_dir)
    md5 = lineage.get(ARTIFACT_MD5) or content_md5(stage_dir)
    experiment_key = experiment_id(client, experiment)

    existing = _find_run(client, experiment_key, record["stage"], record["name"], md5)
    if existing is not None:
        if log_artifacts and existing.data.tags.get(ARTIFACTS_LOGGED) != "true":
            _log_folder(client, existing.info.run_id, stage_dir)
        return existing.info.run_id

    tags = {"config_hash": str(record["config_hash"]), **{str(k): str(v) for k, v in lineage.items()}}
    tags.update({"stage": record["stage"], "name": record["name"], "stage.config_hash": str(record["config_hash"]),
                 ARTIFACT_MD5: md5, ARTIFACTS_LOGGED: "false",
                 "mlflow.runName": f"{record['stage']}:{record['name']}"})
    if "git_revision" in lineage:
        tags["mlflow.source.git.commit"] = str(lineage["git_revision"])
    tag_list = [RunTag(k, v) for k, v in tags.items()]
    params = [Param(str(k), str(v)) for k, v in record["params"].items()]
    metrics = _stage_metrics(record, stage_dir / "stage.json", int(time.time() * 1000))

    run_id = client.create_run(experiment_key, run_name=tags["mlflow.runName"]).info.run_id
    try:
        for start in range(0, max(len(tag_list), len(params), len(metrics)), _BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + _BATCH], params=params[start:start + _BATCH],
                             tags=tag_list[start:start + _BATCH])
        if log_artifacts:
            _log_folder(client, run_id, stage_dir)
    except BaseException:
        # A half-logged run stays FAILED, so the idempotency lookup (FINISHED only) ignores it.
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id


def log_model_folder(store: str | MlflowClient, run_id: str, save: Callable[[Path], object],
                     artifact_path: str = PYFUNC_PATH) -> None:
    """Log the model folder ``save(folder)`` writes (e.g. a pyfunc model) under ``artifact_path``
    of the run, once: a run tagged as having it already is left as it is."""
    client = _client(store)
    tag = f"{MODEL_LOGGED}.{artifact_path}"
    if client.get_run(run_id).data.tags.get(tag) == "true":
        return
    with tempfile.TemporaryDirectory(prefix="cf-model-") as staging:
        folder = Path(staging) / "model"
        save(folder)
        client.log_artifacts(run_id, str(folder), artifact_path)
    client.set_tag(run_id, tag, "true")


# ---------------------------------------------------------------- registry


def _versions(client: MlflowClient, name: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        versions += list(page)
        token = page.token
        if not token:
            return versions


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _no_worse(new: float | None, champion: float | None, higher_is_better: bool) -> bool:
    """An unscored champion yields to any version; an unscored version never displaces a scored one."""
    if champion is None:
        return True
    if new is None:
        return False
    return new >= champion if higher_is_better else new <= champion


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _score(version) -> float | None:
    value = version.tags.get(SCORE)
    return None if value in (None, "") else float(value)


def register_version(store: str | MlflowClient, model_name: str, run_id: str, lineage: Mapping[str, str],
                     score: float | None, higher_is_better: bool = True,
                     artifact_path: str = ARTIFACT_PATH) -> tuple[str, bool]:
    """Register ``runs:/<run_id>/<artifact_path>`` as a version of ``model_name``.

    Version tags: the lineage, ``artifact.md5`` (from ``lineage`` or the run), ``run_id`` and
    the score. A version with the same ``artifact.md5`` and the same kind of source (the run's
    ``artifact_path``: ``output`` or ``pyfunc``) is returned instead of a new one (the alias
    untouched); a version registered before the pyfunc model existed gets a successor.
    ``champion`` moves to the new version when it is no worse than the current champion (ties
    move it: the newest of equals wins). Returns (version, moved).
    """
    client = _client(store)
    run = client.get_run(run_id)
    md5 = lineage.get(ARTIFACT_MD5) or run.data.tags.get(ARTIFACT_MD5)
    _ensure_registered_model(client, model_name)
    if md5:
        versions = _versions(client, model_name)
        same = [v for v in versions if v.tags.get(ARTIFACT_MD5) == md5 and v.source.endswith(f"/{artifact_path}")]
        if same:
            found = max(same, key=lambda v: int(v.version))
            return str(found.version), _finish_alias(client, model_name, found, versions)

    tags = {str(k): str(v) for k, v in lineage.items()}
    tags.update({ARTIFACT_MD5: md5 or "", "run_id": run_id, "stage": run.data.tags.get("stage", ""),
                 SCORE: "" if score is None else repr(float(score)),
                 SCORE_HIGHER_IS_BETTER: str(bool(higher_is_better)).lower()})
    version = client.create_model_version(model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                          tags=tags)
    champion = _champion(client, model_name)
    moved = champion is None or _no_worse(None if score is None else float(score), _score(champion),
                                          higher_is_better)
    if moved:
        client.set_registered_model_alias(model_name, CHAMPION, str(version.version))
    return str(version.version), moved


def _finish_alias(client: MlflowClient, model_name: str, found, versions: list) -> bool:
    """Move ``champion`` to ``found`` when it is the newest version, not yet champion and no worse
    than the champion: what registering it would have done had its run not been killed between
    creating the version and moving the alias. Returns whether the alias moved."""
    if int(found.version) != max(int(v.version) for v in versions):
        return False
    champion = _champion(client, model_name)
    if champion is not None and str(champion.version) == str(found.version):
        return False
    higher_is_better = found.tags.get(SCORE_HIGHER_IS_BETTER, "true") == "true"
    if champion is None or _no_worse(_score(found), _score(champion), higher_is_better):
        client.set_registered_model_alias(model_name, CHAMPION, str(found.version))
        return True
    return False


# ---------------------------------------------------------------- an unreachable server

_UNREACHABLE = ("failed with exception", "Connection refused", "Max retries exceeded", "OperationalError",
                "could not connect to server", "Temporarily Unavailable", "503", "502", "504")


def server_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server (or its database) could not be reached."""
    try:
        import requests

        if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, MlflowException):
        if error.error_code in ("TEMPORARILY_UNAVAILABLE",):
            return True
        message = str(error)
        return error.error_code == "INTERNAL_ERROR" and any(text in message for text in _UNREACHABLE)
    return False


def _env_number(name: str, default: float, kind=float):
    value = os.environ.get(name, "").strip()
    try:
        return kind(value) if value else default
    except ValueError:
        raise RegistryError(f"{name}={value!r} is not a number") from None


def with_server_retries(uri: str, action: Callable[[], object], tries: int | None = None,
                        backoff_s: float | None = None, sleep: Callable[[float], None] = time.sleep):
    """``action()``, tried again while the tracking server is unreachable; ``action`` must be
    idempotent (every registry call here is). ``tries`` (default CONCEPTFLOW_MLFLOW_TRIES or 3)
    attempts with waits of ``backoff_s`` (CONCEPTFLOW_MLFLOW_BACKOFF_S or 2), twice that, ...
    in between; then a ``RegistryError`` naming ``uri`` and what to do. Other errors pass."""
    tries = max(1, int(tries if tries is not None else _env_number("CONCEPTFLOW_MLFLOW_TRIES", 3, int)))
    backoff_s = float(backoff_s if backoff_s is not None else _env_number("CONCEPTFLOW_MLFLOW_BACKOFF_S", 2.0))
    started = time.monotonic()
    for attempt in range(1, tries + 1):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - classified right here
            if not server_unreachable(error):
                raise
            last = error
        if attempt < tries:
            sleep(backoff_s * 2 ** (attempt - 1))
    first_line = str(last).strip().splitlines()[0][:300] if str(last).strip() else type(last).__name__
    raise RegistryError(
        f"the MLflow tracking server at {uri} is unreachable ({tries} tries over "
        f"{time.monotonic() - started:.0f} s; last error: {first_line}). Start it (or point MLFLOW_TRACKING_URI "
        "at a running one) and run again: finished stages are kept, and what is already registered is found, "
        "not registered twice") from None


def lookup(store: str | MlflowClient, model_name: str, alias: str | None = CHAMPION,
           version: str | None = None) -> dict:
    """A version (by alias, or by number when ``version`` is given) as a plain dict.

    Keys: name, version, aliases, run_id, source, download_uri, score, tags (the lineage).
    """
    client = _client(store)
    try:
        entry = (client.get_model_version(model_name, str(version)) if version is not None
                 else client.get_model_version_by_alias(model_name, alias))
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        wanted = f"version {version}" if version is not None else f"alias {alias!r}"
        raise ModelUnavailableError(
            f"registered model {model_name!r} has no {wanted} in {client.tracking_uri}; "
            "run the pipeline to register it, or point MLFLOW_TRACKING_URI at the store that holds it"
        ) from None
    return {
        "name": model_name,
        "version": str(entry.version),
        "aliases": list(entry.aliases),
        "run_id": entry.run_id,
        "source": entry.source,
        "download_uri": client.get_model_version_download_uri(model_name, str(entry.version)),
        "score": _score(entry),
        "tags": dict(entry.tags),
    }


def download(store: str | MlflowClient, model_name: str, alias: str | None, dst: Path,
             version: str | None = None) -> Path:
    """Copy a version's stage folder to ``dst`` (replaced atomically) and return ``dst``.

    A version whose source is the run's pyfunc model gives the run's stage folder (``output/``)
    all the same; the pyfunc model itself is ``models:/<name>@<alias>``."""
    client = _client(store)
    entry = lookup(client, model_name, alias, version)
    if not entry["source"].startswith(f"runs:/{entry['run_id']}/"):
        raise RegistryError(f"{model_name} version {entry['version']} has source {entry['source']!r}, "
                            "not a run's artifact folder; re-register it with register_version")
    artifact_path = entry["source"][len(f"runs:/{entry['run_id']}/"):]
    if artifact_path == PYFUNC_PATH:
        artifact_path = ARTIFACT_PATH
    dst = Path(dst)
    with atomic_directory(dst) as staging:
        # Where the files land differs by store (the folder itself locally, <dst>/<leaf> over
        # HTTP), so download beside the staging folder and copy whatever came back.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=dst.parent) as scratch:
            fetched = Path(client.download_artifacts(entry["run_id"], artifact_path, scratch))
            shutil.copytree(fetched, staging, dirs_exist_ok=True)
    return dst
