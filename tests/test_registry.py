"""MLflow registry: stage runs, versions, the champion alias, lineage, idempotency, server mode."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from conceptflow import errors, registry
from conceptflow.errors import ModelUnavailableError
from conceptflow.fileio import content_md5

LINEAGE = {
    "dvc.images.md5": "11111111111111111111111111111111.dir",
    "dvc.masks.md5": "22222222222222222222222222222222.dir",
    "config_hash": "cfg-abc",
    "git_revision": "0123456789abcdef0123456789abcdef01234567",
    "base_model": "embedded:tiny-sd",
    "base_model_hash": "b" * 32,
    "catalog": "catalog.yaml",
}


def make_stage_dir(root: Path, name: str, payload: bytes, stage: str = "train", final_loss: float = 0.25) -> Path:
    """A fake trained-concept folder as the pipeline's stages write it."""
    stage_dir = root / f"{stage}-{name}-{uuid.uuid4().hex[:6]}"
    stage_dir.mkdir(parents=True)
    (stage_dir / "adapter.safetensors").write_bytes(payload)
    (stage_dir / "concept.json").write_text(json.dumps({"method": "edlora", "tokens": [f"<{name}1>"]}))
    (stage_dir / "samples").mkdir()
    (stage_dir / "samples" / "0.png").write_bytes(b"\x89PNG fake " + payload[:8])
    (stage_dir / ".adapter.safetensors.tmp").write_bytes(b"half-written")  # must not be logged
    (stage_dir / "stage.json").write_text(json.dumps({
        "stage": stage, "name": name, "config_hash": "cfg-abc",
        "params": {"rank": 4, "lr": 1e-4, "method": "edlora", "text_encoder": True},
        "metrics": {"loss": final_loss, "identity": 0.7, "kid": None},  # None: not computed
        "history": [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}, {"step": 2, "loss": final_loss}],
    }))
    return stage_dir


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables costs seconds); tests use their own names."""
    return f"sqlite:///{tmp_path_factory.mktemp('project').resolve() / 'mlruns.db'}"


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def test_tracking_uri_default_is_absolute_sqlite_and_env_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert registry.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert registry.tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://postgres@127.0.0.1:5432/test")
    assert registry.tracking_uri(tmp_path).startswith("postgresql+psycopg2://")


def test_stage_run_holds_params_metrics_history_tags_and_folder(store, tmp_path):
    stage_dir = make_stage_dir(tmp_path, "dog", b"weights-v1")
    experiment = unique("exp-")
    run_id = registry.log_stage_run(store, experiment, stage_dir, LINEAGE, log_artifacts=True)

    client = registry._client(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"rank": "4", "lr": "0.0001", "method": "edlora", "text_encoder": "True"}
    assert run.data.metrics == {"loss": 0.25, "identity": 0.7}
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.25)]
    for key, value in LINEAGE.items():
        assert run.data.tags[key] == value
    assert run.data.tags["stage"] == "train" and run.data.tags["name"] == "dog"
    assert run.data.tags["stage.config_hash"] == "cfg-abc"
    assert run.data.tags[registry.ARTIFACT_MD5] == content_md5(stage_dir)
    assert run.data.tags["mlflow.source.git.commit"] == LINEAGE["git_revision"]

    logged = {a.path for a in client.list_artifacts(run_id, registry.ARTIFACT_PATH)}
    assert logged == {"output/adapter.safetensors", "output/concept.json", "output/samples", "output/stage.json"}
    # The experiment keeps its artifacts beside the SQLite file, not in the cwd.
    database_dir = Path(store[len("sqlite:///"):]).parent
    assert (database_dir / "mlartifacts").is_dir()
    assert client.get_experiment_by_name(experiment).artifact_location == (database_dir / "mlartifacts").as_uri()


def test_stage_run_is_idempotent_per_artifact_md5(store, tmp_path):
    experiment = unique("exp-")
    first_dir = make_stage_dir(tmp_path, "cat", b"weights-v1")
    first = registry.log_stage_run(store, experiment, first_dir, LINEAGE, log_artifacts=False)
    # Same content again (a second pipeline run with nothing changed), now asking for artifacts.
    again = registry.log_stage_run(store, experiment, first_dir, LINEAGE, log_artifacts=True)
    changed = registry.log_stage_run(store, experiment, make_stage_dir(tmp_path, "cat", b"weights-v2"), LINEAGE,
                                     log_artifacts=False)
    other_name = registry.log_stage_run(store, experiment, make_stage_dir(tmp_path, "owl", b"weights-v1"),
                                        LINEAGE, log_artifacts=False)

    client = registry._client(store)
    runs = client.search_runs([registry.experiment_id(client, experiment)])
    assert again == first
    assert len({first, changed, other_name}) == 3 and len(runs) == 3
    assert client.get_run(first).data.tags[registry.ARTIFACTS_LOGGED] == "true"
    assert {a.path for a in client.list_artifacts(first, registry.ARTIFACT_PATH)} >= {"output/adapter.safetensors"}


@pytest.mark.parametrize("higher_is_better, scores, expected_moves, expected_champion", [
    # scores of versions 1..4 in order; the fourth ties the champion and so takes the alias
    (True, [0.5, 0.4, 0.6, 0.6], [True, False, True, True], "4"),
    (False, [0.5, 0.6, 0.4, 0.45], [True, False, True, False], "3"),
    # an unscored version never displaces a scored champion
    (True, [0.5, None], [True, False], "1"),
])
def test_champion_moves_only_when_no_worse(store, tmp_path, higher_is_better, scores, expected_moves,
                                           expected_champion):
    experiment, name = unique("exp-"), registry.model_name("concept", unique("dog"))
    moves = []
    for index, score in enumerate(scores):
        run_id = registry.log_stage_run(store, experiment, make_stage_dir(tmp_path, "dog", f"w{index}".encode()),
                                        LINEAGE, log_artifacts=True)
        version, moved = registry.register_version(store, name, run_id, LINEAGE, score,
                                                   higher_is_better=higher_is_better)
        assert version == str(index + 1)
        moves.append(moved)
    assert moves == expected_moves
    champion = registry.lookup(store, name)
    assert champion["version"] == expected_champion
    assert champion["score"] == scores[int(expected_champion) - 1]


def test_version_tags_carry_lineage_and_reregistering_adds_nothing(store, tmp_path):
    experiment, name = unique("exp-"), f"combo.{unique('dog')}+cat"
    stage_dir = make_stage_dir(tmp_path, "dog+cat", b"fused", stage="fuse")
    lineage = {**LINEAGE, "concept.dog.version": "3", "concept.cat.version": "1"}
    run_id = registry.log_stage_run(store, experiment, stage_dir, lineage, log_artifacts=True)
    first = registry.register_version(store, name, run_id, lineage, 0.8)

    rerun_id = registry.log_stage_run(store, experiment, stage_dir, lineage, log_artifacts=True)
    second = registry.register_version(store, name, rerun_id, lineage, 0.9)

    assert rerun_id == run_id
    assert first == ("1", True) and second == ("1", False)
    assert len(registry._versions(registry._client(store), name)) == 1
    found = registry.lookup(store, name)
    assert found["source"] == f"runs:/{run_id}/output" and found["run_id"] == run_id
    for key, value in lineage.items():
        assert found["tags"][key] == value
    assert found["tags"][registry.ARTIFACT_MD5] == content_md5(stage_dir)


def test_download_and_models_uri_return_the_logged_folder(store, tmp_path, monkeypatch):
    import mlflow

    experiment, concept = unique("exp-"), unique("dog")
    name = registry.model_name("concept", concept)
    stage_dir = make_stage_dir(tmp_path, concept, b"weights-final")
    run_id = registry.log_stage_run(store, experiment, stage_dir, LINEAGE, log_artifacts=True)
    registry.register_version(store, name, run_id, LINEAGE, 0.5)

    # content_md5 skips hidden files, as the logged folder does.
    downloaded = registry.download(store, name, "champion", tmp_path / "fetched")
    assert downloaded == tmp_path / "fetched" and content_md5(downloaded) == content_md5(stage_dir)
    assert not (downloaded / ".adapter.safetensors.tmp").exists()

    # What a user types: the standard models:/ URI against the same store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    via_uri = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "uri"))
    assert content_md5(Path(via_uri)) == content_md5(stage_dir)


def test_lookup_of_missing_alias_names_the_model(store):
    with pytest.raises(ModelUnavailableError, match="concept.nobody"):
        registry.lookup(store, "concept.nobody")


def test_stage_folder_without_stage_json_is_a_user_error(store, tmp_path):
    with pytest.raises(errors.RegistryError, match="stage.json"):  # a ConceptflowError: the CLI prints it
        registry.log_stage_run(store, "exp", tmp_path, LINEAGE, log_artifacts=False)
    assert registry.RegistryError is errors.RegistryError and issubclass(errors.RegistryError, errors.ConceptflowError)


def test_non_numeric_metric_is_a_user_error_and_logs_no_run(store, tmp_path):
    stage_dir = make_stage_dir(tmp_path, "dog", b"w")
    record = json.loads((stage_dir / "stage.json").read_text())
    record["metrics"]["identity"] = "high"
    (stage_dir / "stage.json").write_text(json.dumps(record))
    experiment = unique("exp-")
    with pytest.raises(registry.RegistryError, match="identity"):
        registry.log_stage_run(store, experiment, stage_dir, LINEAGE, log_artifacts=False)
    client = registry._client(store)
    assert client.search_runs([registry.experiment_id(client, experiment)], run_view_type=3) == []


def test_model_names_reject_what_mlflow_cannot_hold():
    assert registry.model_name("combo", "dog+cat") == "combo.dog+cat"
    with pytest.raises(registry.RegistryError, match="dog/cat"):
        registry.model_name("combo", "dog/cat")


# ---------------------------------------------------------------- server mode on PostgreSQL

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
# A schema of its own, kept between runs: MLflow's migrations take tens of seconds on an empty
# database, so only the first run pays them; names carry a uuid so runs never collide.
SCHEMA = "conceptflow_registry_test"


def _postgres_schema_uri() -> str:
    try:
        import psycopg2
        connection = psycopg2.connect(POSTGRES, connect_timeout=3)
    except Exception as error:  # noqa: BLE001 - any failure means "no database here"
        pytest.skip(f"PostgreSQL at {POSTGRES} is unreachable ({error}); server-mode test skipped")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    connection.close()
    return f"{POSTGRES}?options=-csearch_path%3D{SCHEMA}"


def test_server_mode_on_postgresql_registers_and_looks_up_over_http(tmp_path):
    backend = _postgres_schema_uri()
    experiment, name = unique("server-exp-"), f"combo.{unique('dog')}+cat"
    stage_dir = make_stage_dir(tmp_path, "dog+cat", b"fused-weights", stage="fuse")
    worse_dir = make_stage_dir(tmp_path, "dog+cat", b"fused-weights-worse", stage="fuse")

    from flows.server import mlflow_server

    with mlflow_server(backend, tmp_path / "artifacts") as (process, uri):
        assert uri.startswith("http://127.0.0.1:")
        run_id = registry.log_stage_run(uri, experiment, stage_dir, LINEAGE, log_artifacts=True)
        assert registry.register_version(uri, name, run_id, LINEAGE, 0.7) == ("1", True)
        worse_run = registry.log_stage_run(uri, experiment, worse_dir, LINEAGE, log_artifacts=True)
        assert registry.register_version(uri, name, worse_run, LINEAGE, 0.6) == ("2", False)
        # nothing changed: same run, same version
        assert registry.log_stage_run(uri, experiment, stage_dir, LINEAGE, log_artifacts=True) == run_id
        assert registry.register_version(uri, name, run_id, LINEAGE, 0.7) == ("1", False)

        found = registry.lookup(uri, name)
        assert found["version"] == "1" and found["tags"]["dvc.images.md5"] == LINEAGE["dvc.images.md5"]
        downloaded = registry.download(uri, name, "champion", tmp_path / "fetched")
        assert content_md5(downloaded) == content_md5(stage_dir)
        # the proxied artifacts landed in the folder the server was given
        assert list((tmp_path / "artifacts").rglob("adapter.safetensors"))

        client = registry._client(uri)
        client.delete_registered_model(name)
        client.delete_experiment(registry.experiment_id(client, experiment))
    assert process.poll() is not None


def test_stage_names_come_from_the_stage_table():
    from conceptflow.stages.register import STAGE_OF
    from conceptflow.stages.table import STAGES

    assert registry.STAGES == tuple(row.name for row in STAGES)
    assert STAGE_OF == {"images": "ingest", "masks": "mask", "adapter": "train", "fused": "fuse",
                        "generated": "generate", "metrics": "evaluate"}


def test_pyfunc_sourced_version_succeeds_an_output_version_and_download_gives_the_stage_folder(store, tmp_path):
    experiment, concept = unique("exp-"), unique("dog")
    name = registry.model_name("concept", concept)
    stage_dir = make_stage_dir(tmp_path, concept, b"weights-pyfunc")
    run_id = registry.log_stage_run(store, experiment, stage_dir, LINEAGE, log_artifacts=True)
    assert registry.register_version(store, name, run_id, LINEAGE, 0.5) == ("1", True)

    saves = []

    def save(folder: Path) -> None:
        saves.append(folder)
        folder.mkdir()
        (folder / "MLmodel").write_text("flavors: {}\n")

    registry.log_model_folder(store, run_id, save)
    registry.log_model_folder(store, run_id, save)  # logged once per run
    assert len(saves) == 1
    client = registry._client(store)
    assert [f.path for f in client.list_artifacts(run_id, registry.PYFUNC_PATH)] == ["pyfunc/MLmodel"]

    # same md5, but the old version has no pyfunc source: a successor, then idempotent again
    assert registry.register_version(store, name, run_id, LINEAGE, 0.5, artifact_path=registry.PYFUNC_PATH) == ("2", True)
    assert registry.register_version(store, name, run_id, LINEAGE, 0.5, artifact_path=registry.PYFUNC_PATH) == ("2", False)
    assert registry.lookup(store, name)["source"] == f"runs:/{run_id}/pyfunc"
    downloaded = registry.download(store, name, "champion", tmp_path / "fetched")
    assert content_md5(downloaded) == content_md5(stage_dir) and not (downloaded / "MLmodel").exists()
