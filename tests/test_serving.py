"""Serving registered versions: `conceptflow sample --model` from the registry, the pyfunc flavour,
`mlflow models serve`, and generation from a clean checkout that has only the server and the
DVC remote.

One tiny project (embedded:tiny-sd, two toy concepts trained 2 steps, one combination, the
fused sampler at 3 steps) is made, recorded in DVC and registered on a real `mlflow server`
backed by a PostgreSQL database of its own (created here, dropped at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conceptflow.errors import ConceptflowError, ModelUnavailableError
from conceptflow.serving.reference import ModelReference, parse_model_reference, parse_seeds

ROOT = Path(__file__).resolve().parents[1]
FIRST, SECOND = "zigzag_star", "quartered_heart"
COMBO = f"{FIRST}+{SECOND}"
PROMPT = f"a <{FIRST}> and a <{SECOND}>"
SEEDS = [0, 1]
POSTGRES_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=3)


# ---------------------------------------------------------------- references, seeds, settings


def test_seeds_ranges_and_lists():
    assert parse_seeds("0-7") == list(range(8))
    assert parse_seeds("0,3,5") == [0, 3, 5]
    assert parse_seeds("4-5, 1, 4") == [4, 5, 1]
    for bad in ("3-1", "a", "0,,2", "-1"):
        with pytest.raises(ConceptflowError, match="seeds"):
            parse_seeds(bad)


def test_model_references():
    assert parse_model_reference("combo.dog+cat@champion") == ModelReference("combo.dog+cat", "champion")
    assert parse_model_reference("models:/concept.dog/3") == ModelReference("concept.dog", None, "3")
    assert parse_model_reference("concept.dog") == ModelReference("concept.dog", "champion")
    assert parse_model_reference("combo.dog+cat/2").models_uri == "models:/combo.dog+cat/2"
    for bad in ("dog@champion", "concept.dog/latest", "combo.x@"):
        with pytest.raises(ConceptflowError):
            parse_model_reference(bad)


def _spec(**changes):
    from conceptflow.serving.spec import ServingSpec

    fields = dict(kind="combo", name="a+b", concepts=["a", "b"], base_model="embedded:tiny-sd", base_model_hash="",
                  base_model_path=None, resolution=64, dtype="float32", artifact_md5="x.dir", content_md5="y",
                  generate={"sampler": "fused", "steps": 3})
    return ServingSpec(**{**fields, **changes})


def test_settings_are_the_recorded_ones_with_overrides():
    spec = _spec()
    assert (spec.settings().sampler, spec.settings().steps) == ("fused", 3)
    assert spec.settings(steps=7, guidance_scale=2.0).model_dump()["steps"] == 7
    assert spec.settings(sampler="conceptflow_m").steps == 3  # the catalog set steps: kept, as generate --sampler does
    assert _spec(generate={}).settings(sampler="conceptflow_m").steps == 50  # else the sampler's default
    with pytest.raises(ConceptflowError, match="nope"):
        spec.settings(sampler="nope")
    assert type(spec).from_dict(spec.to_dict()) == spec
    with pytest.raises(ConceptflowError, match="re-register"):
        type(spec).from_dict({"kind": "combo"})


# ---------------------------------------------------------------- the base model on a clean checkout


def _clean_copy(destination: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked + new, not ignored), without data/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = ROOT / relative
        if relative.split("/")[0] in ("data", "mlruns", "mlartifacts") or not source.is_file():
            continue
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination / relative)
    return destination


@pytest.fixture(scope="module")
def clean_checkout(tmp_path_factory) -> Path:
    return _clean_copy(tmp_path_factory.mktemp("clean") / "conceptflow")


def test_project_relative_toy_base_resolves_in_a_clean_checkout_and_its_hash_is_checked(clean_checkout, tmp_path):
    from conceptflow.models.loading import model_fingerprint
    from conceptflow.serving.base_model import project_relative_path, resolve_base_model

    recorded_hash = model_fingerprint(str(ROOT / "assets" / "toy-base"))  # what registration records
    assert project_relative_path(str(ROOT / "assets" / "toy-base"), ROOT) == "assets/toy-base"
    assert project_relative_path("embedded:tiny-sd", ROOT) is None
    found = resolve_base_model("assets/toy-base", recorded_hash, "assets/toy-base", project=clean_checkout)
    assert found == str((clean_checkout / "assets" / "toy-base").resolve())

    altered = _clean_copy_of_base(clean_checkout, tmp_path)
    with pytest.raises(ModelUnavailableError, match="content hash"):
        resolve_base_model("assets/toy-base", recorded_hash, "assets/toy-base", project=altered)
    assert resolve_base_model("assets/toy-base", recorded_hash, "assets/toy-base", project=altered, verify=False)
    with pytest.raises(ModelUnavailableError, match="--project"):
        resolve_base_model("assets/toy-base", recorded_hash, "assets/toy-base", project=tmp_path / "nowhere")


def _clean_copy_of_base(checkout: Path, tmp_path: Path) -> Path:
    project = tmp_path / "altered"
    shutil.copytree(checkout / "assets" / "toy-base", project / "assets" / "toy-base")
    config = project / "assets" / "toy-base" / "unet" / "config.json"
    config.write_text(config.read_text().replace("{", "{\"_altered\": true, ", 1))
    return project


# ---------------------------------------------------------------- DVC remote reading


def test_dvc_remote_listing_check_and_materialise(tmp_path):
    from conceptflow.fileio import file_md5
    from conceptflow.serving import dvc_remote

    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"weights")
    (folder / "sub" / "b.json").write_text("{}")
    (folder / ".manifest.json").write_text("hidden")
    remote = tmp_path / "remote"
    entries = [{"md5": file_md5(f), "relpath": f.relative_to(folder).as_posix()} for f in sorted(folder.rglob("*"))
               if f.is_file()]
    for entry in entries:
        target = remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / entry["relpath"], target)
    dir_md5 = "ab" + "c" * 30 + ".dir"
    (remote / "files" / "md5" / "ab").mkdir(parents=True, exist_ok=True)
    (remote / "files" / "md5" / "ab" / dir_md5[2:]).write_text(json.dumps(entries))

    copy = dvc_remote.materialise(remote, dir_md5, tmp_path / "copy")
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == ["a.bin", "sub/b.json"]
    dvc_remote.check_folder(copy, remote, dir_md5)
    (copy / "a.bin").write_bytes(b"other weights")
    with pytest.raises(ConceptflowError, match="differs from what DVC recorded"):
        dvc_remote.check_folder(copy, remote, dir_md5)
    with pytest.raises(ConceptflowError, match="no object"):
        dvc_remote.folder_listing(remote, "ff" + "0" * 30 + ".dir")

    (tmp_path / "proj" / ".dvc").mkdir(parents=True)
    (tmp_path / "proj" / ".dvc" / "config").write_text(
        "[core]\n    remote = local\n['remote \"local\"']\n    url = ../../remote\n")
    assert dvc_remote.project_remote(tmp_path / "proj") == remote.resolve()


# ---------------------------------------------------------------- the tiny registered project


TEMPLATE = "conceptflow_serving_template"  # MLflow's tables, migrated once per machine


def _ensure_template(admin) -> None:
    """A database holding MLflow's migrated schema: the first start on an empty database runs
    MLflow's migrations (~50 s); a copy of this template starts in seconds. Kept between runs."""
    with admin.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEMPLATE,))
        if cursor.fetchone():
            return
        building = f"{TEMPLATE}_build_{uuid.uuid4().hex[:6]}"
        cursor.execute(f"CREATE DATABASE {building}")
        try:
            subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade",
                            f"postgresql+psycopg2://postgres@127.0.0.1:5432/{building}"], check=True,
                           capture_output=True, timeout=600)
            cursor.execute(f"ALTER DATABASE {building} RENAME TO {TEMPLATE}")
        except Exception:
            cursor.execute(f"DROP DATABASE IF EXISTS {building} WITH (FORCE)")
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEMPLATE,))
            if not cursor.fetchone():  # a concurrent run may have renamed its own first
                raise


@pytest.fixture(scope="module")
def postgres_database():
    """A PostgreSQL database of this module's own (a copy of the migrated template), dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(**POSTGRES_ADMIN)
    except psycopg2.OperationalError as error:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {error}")
    admin.autocommit = True
    _ensure_template(admin)
    name = f"conceptflow_serving_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def _tiny_catalog() -> dict:
    concepts = {name: {"class_word": word, "images": f"assets/toy-concepts/{name}",
                       "train": {"method": method, "steps": 2, "checkpoint_every": 2}}
                for name, word, method in ((FIRST, "star", "edlora"), (SECOND, "heart", "conceptflow_s"))}
    return {"project": "serving-test", "base_model": "embedded:tiny-sd", "device": "cpu", "dtype": "float32",
            "resolution": 64, "seed": 0, "concepts": concepts,
            "combinations": {COMBO: {"concepts": [FIRST, SECOND], "prompts": [PROMPT], "seeds": SEEDS}},
            "mask": {"backend": "auto"}, "fuse": {"method": "average"},
            "generate": {"sampler": "fused", "steps": 3, "batch_size": 4}, "evaluate": {}}


def _make_project(project: Path):
    """The tiny project through every stage (report included: dvc commit records every dvc.yaml
    stage's outputs), recorded in DVC and pushed to its local remote."""
    from conceptflow.config import load_catalog
    from conceptflow.lineage import record_outputs
    from conceptflow.stages.table import plan

    for name in (FIRST, SECOND):  # two photos each: enough to train two steps
        photos = project / "assets" / "toy-concepts" / name
        photos.mkdir(parents=True)
        for stem in ("00", "01"):
            for suffix in (".png", ".txt"):
                shutil.copy(ROOT / "assets" / "toy-concepts" / name / f"{stem}{suffix}", photos)
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    (project / "catalog.yaml").write_text(yaml.safe_dump(_tiny_catalog(), sort_keys=False))
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *command], cwd=project, check=True)
    catalog = load_catalog(project / "catalog.yaml")
    for row, item in plan(catalog):
        row.call(catalog, item)
    record_outputs(project, push=True)
    return catalog


@pytest.fixture(scope="module")
def registered(postgres_database, tmp_path_factory, one_torch_thread):
    """The tiny project registered on a real `mlflow server` (PostgreSQL); the server starts while
    the project is made."""
    from concurrent.futures import ThreadPoolExecutor

    from conceptflow.stages.register import register
    from flows.server import mlflow_server

    project = tmp_path_factory.mktemp("project")
    with ThreadPoolExecutor(1) as pool:
        made = pool.submit(_make_project, project)
        with mlflow_server(postgres_database, tmp_path_factory.mktemp("mlflow-artifacts")) as (process, uri):
            catalog = made.result()
            previous = os.environ.get("MLFLOW_TRACKING_URI")
            os.environ["MLFLOW_TRACKING_URI"] = uri
            try:
                lines = register(catalog)
                again = register(catalog)  # nothing changed: nothing new
                yield {"project": project, "catalog": catalog, "uri": uri, "lines": lines, "again": again,
                       "remote": project / ".dvc-remote"}
            finally:
                if previous is None:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = previous
    assert process.poll() is not None  # the server stopped with the module


def generated(registered) -> list[np.ndarray]:
    """The generate stage's images of the combination, in request order (the seeds of PROMPT)."""
    folder = registered["project"] / "data" / "generated" / COMBO
    rows = json.loads((folder / "images.json").read_text())["images"]
    assert [(row["prompt"], row["seed"]) for row in rows] == [(PROMPT, seed) for seed in SEEDS]
    return [np.asarray(Image.open(folder / row["file"]).convert("RGB")) for row in rows]


def test_register_makes_pyfunc_versions_once(registered):
    from conceptflow import registry

    assert registered["lines"] == [f"concept.{FIRST} v1 (champion)", f"concept.{SECOND} v1 (champion)",
                                   f"combo.{COMBO} v1 (champion)"]
    assert registered["again"] == [f"concept.{FIRST} v1", f"concept.{SECOND} v1", f"combo.{COMBO} v1"]
    entry = registry.lookup(registered["uri"], f"combo.{COMBO}")
    assert entry["source"] == f"runs:/{entry['run_id']}/{registry.PYFUNC_PATH}"
    assert entry["tags"]["artifact.md5"].endswith(".dir")  # the DVC md5 from dvc.lock
    # `registry download` still gives the stage folder (not the pyfunc model)
    folder = registry.download(registered["uri"], f"combo.{COMBO}", "champion",
                               registered["project"] / "downloaded")
    assert (folder / "adapter.safetensors").is_file() and not (folder / "MLmodel").exists()


def test_sample_a_single_concept_from_the_registry(registered, tmp_path, one_torch_thread):
    from conceptflow.serving.from_registry import sample_registered

    header = sample_registered(registered["uri"], parse_model_reference(f"concept.{FIRST}@champion"),
                               [f"a <{FIRST}>"], [0, 3], tmp_path / "out", steps=2, remote=registered["remote"])
    assert header["version"] == "1" and header["dvc_checked"] and header["artifact_source"] == "registry"
    listing = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [(row["file"], row["seed"]) for row in listing["images"]] == [("000.png", 0), ("001.png", 3)]
    assert listing["settings"]["steps"] == 2 and listing["sampler"] == "fused"
    images = [np.asarray(Image.open(tmp_path / "out" / row["file"])) for row in listing["images"]]
    assert images[0].shape == (64, 64, 3) and not np.array_equal(images[0], images[1])


def test_sample_reads_the_files_from_dvc_and_refuses_a_damaged_copy(registered, tmp_path, one_torch_thread):
    from conceptflow.serving.from_registry import sample_registered

    reference = parse_model_reference(f"combo.{COMBO}/1")
    header = sample_registered(registered["uri"], reference, [PROMPT], SEEDS, tmp_path / "dvc",
                               remote=registered["remote"], from_dvc=True)
    assert header["artifact_source"] == "dvc"
    for index, expected in enumerate(generated(registered)):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "dvc" / f"{index:03d}.png").convert("RGB")), expected)

    # a remote whose record differs from the registry's copy is refused
    damaged = tmp_path / "damaged-remote"
    shutil.copytree(registered["remote"], damaged)
    listing_md5 = header["artifact_md5"]
    listing = damaged / "files" / "md5" / listing_md5[:2] / listing_md5[2:]
    entries = json.loads(listing.read_text())
    next(entry for entry in entries if entry["relpath"] == "adapter.safetensors")["md5"] = "0" * 32
    listing.chmod(0o644)
    listing.write_text(json.dumps(entries))
    with pytest.raises(ConceptflowError, match="differs from what DVC recorded"):
        sample_registered(registered["uri"], reference, [PROMPT], [0], tmp_path / "refused", remote=damaged)


def test_pyfunc_loads_every_version_and_predicts_the_generate_stage_images(registered, monkeypatch, one_torch_thread):
    import mlflow.pyfunc
    import pandas as pd

    from conceptflow.serving.pyfunc import decode_png

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    combo = mlflow.pyfunc.load_model(f"models:/combo.{COMBO}@champion")
    frame = combo.predict(pd.DataFrame({"prompt": [PROMPT] * len(SEEDS), "seed": SEEDS}))
    assert list(frame.columns) == ["prompt", "seed", "image"] and list(frame["seed"]) == SEEDS
    for cell, expected in zip(frame["image"], generated(registered)):
        assert np.array_equal(np.asarray(decode_png(cell)), expected)

    for name in (FIRST, SECOND):
        concept = mlflow.pyfunc.load_model(f"models:/concept.{name}/1")
        images = concept.predict({"prompt": [f"a <{name}>"]}, params={"steps": 2})["image"]
        assert decode_png(images[0]).size == (64, 64)


def test_mlflow_models_serve_answers_invocations(registered, tmp_path):
    from conceptflow.services import free_port, local_service
    from conceptflow.serving.pyfunc import decode_png

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           # mlflow models serve runs `uvicorn` from PATH: the venv's bin must be on it
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/combo.{COMBO}@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with local_service("mlflow models serve", command, f"http://127.0.0.1:{port}/ping", env, timeout_s=240):
        body = json.dumps({"dataframe_split": {"columns": ["prompt", "seed"], "data": [[PROMPT, SEEDS[1]]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
    assert [(row["prompt"], row["seed"]) for row in predictions] == [(PROMPT, SEEDS[1])]
    image = np.asarray(decode_png(predictions[0]["image"]))
    assert image.shape == (64, 64, 3)
    # one request of one image: another batch than the generate stage's two, so equality is not
    # promised bit for bit (see serving.generation); it is the same image up to float noise
    assert np.abs(image.astype(int) - generated(registered)[1].astype(int)).max() <= 2


def test_clean_checkout_samples_the_champion_with_only_the_server_and_the_remote(registered, clean_checkout,
                                                                                  tmp_path):
    """A fresh copy of the repository (no data/, no mlruns), a fresh model cache, the project
    folder out of reach: `conceptflow sample` makes the generate stage's images."""
    expected = generated(registered)
    remote = tmp_path / "remote"
    shutil.copytree(registered["remote"], remote)
    project = registered["project"]
    hidden = project.with_name(project.name + "-away")
    project.rename(hidden)  # nothing of the project (catalog, training photos, data/) can be read
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PYTHONPATH": str(clean_checkout),
               "CONCEPTFLOW_CACHE": str(tmp_path / "fresh-cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        out = tmp_path / "images"
        result = subprocess.run([sys.executable, "-m", "conceptflow.cli", "sample", "--model", f"combo.{COMBO}@champion",
                                 "--prompt", PROMPT, "--seeds", "0-1", "--out", str(out), "--dvc-remote", str(remote)],
                                cwd=clean_checkout, env=env, capture_output=True, text=True, timeout=600)
    finally:
        hidden.rename(project)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "checked against DVC" in result.stdout and "verified" in result.stdout
    listing = json.loads((out / "images.json").read_text())
    assert listing["base_model"] == "embedded:tiny-sd" and listing["base_verified"] is True
    assert Path(listing["base_model_source"]).is_relative_to(tmp_path / "fresh-cache")  # rebuilt, hash checked
    for row, image in zip(listing["images"], expected):
        assert np.array_equal(np.asarray(Image.open(out / row["file"]).convert("RGB")), image)


def test_sample_cli_reports_a_missing_version(registered, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from conceptflow.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sample", "--model", f"combo.{COMBO}/9", "--prompt", PROMPT,
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "has no version 9" in result.output
    assert not (tmp_path / "x").exists()


def test_a_concept_that_cannot_merge_is_applied_at_run_time(registered, tmp_path, monkeypatch, one_torch_thread):
    """A concept with a run-time channel samples through adapters.branched.runtime_concepts: with a
    zero text residual it draws what the merged concept draws, and the base weights stay as loaded."""
    import torch

    from conceptflow import registry
    from conceptflow.adapters.effects import TextResidual
    from conceptflow.methods import read_concept
    from conceptflow.serving import generation
    from conceptflow.serving.generation import ServedModel, sample_requests

    folder = registry.download(registered["uri"], f"concept.{FIRST}", "champion", tmp_path / "concept")
    spec = _spec(kind="concept", name=FIRST, concepts=[FIRST])
    requests, settings = sample_requests([f"a <{FIRST}>"], [0]), spec.settings(steps=2)
    merged = ServedModel(folder, spec, "embedded:tiny-sd")
    assert merged.runtime == []

    def with_residual(path, pipeline):
        effects = read_concept(path, pipeline)
        effects.text_residuals.append(TextResidual(next(iter(effects.embeddings)), torch.zeros(32)))
        return effects

    monkeypatch.setattr(generation, "read_concept", with_residual)
    runtime = ServedModel(folder, spec, "embedded:tiny-sd")
    assert len(runtime.runtime) == 1
    before = {name: p.detach().clone() for name, p in runtime.core.pipeline.unet.named_parameters()}
    image_runtime = np.asarray(runtime.sample(requests, settings).images[0]).astype(int)
    image_merged = np.asarray(merged.sample(requests, settings).images[0]).astype(int)
    assert np.abs(image_runtime - image_merged).max() <= 2  # hooks vs merged weights: float rounding only
    after = dict(runtime.core.pipeline.unet.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)
    merged_weights = dict(merged.core.pipeline.unet.named_parameters())  # the merged model's do carry ΔW
    assert any(not torch.equal(before[name], merged_weights[name]) for name in before)
