"""The whole pipeline through `conceptflow run` (Prefect ephemeral, DVC, MLflow sqlite) on the
embedded tiny base, in a fresh git repository holding a copy of the default catalog."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "conceptflow.cli"]


def run_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(project / ".prefect"), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run([*CLI, *args], cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"conceptflow {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("catalog")
    shutil.copytree(ROOT / "assets", project / "assets")
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    catalog = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    for concept in catalog["concepts"].values():
        concept["train"]["steps"] = 6
        concept["train"]["checkpoint_every"] = 3
    catalog["generate"]["steps"] = 6  # SAMA starts at step 4
    (project / "catalog.yaml").write_text(yaml.safe_dump(catalog, sort_keys=False))
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "catalog"]):
        subprocess.run(["git", *command], cwd=project, check=True)
    return project


@pytest.fixture(scope="module")
def first_run(project):
    return run_cli(project, "run", "--catalog", "catalog.yaml")


def test_run_leaves_images_report_and_clean_dvc(project, first_run):
    summary = json.loads(first_run.stdout[first_run.stdout.index("{"):])
    assert summary["dvc_status_clean"] is True
    assert "train:dog" in summary["ran"] and "generate:dog+cat" in summary["ran"]
    listing = json.loads((project / "data/generated/dog+cat/images.json").read_text())["images"]
    assert len(listing) == 4  # 2 prompts x 2 seeds
    assert json.loads((project / "data/generated/dog+cat/images.json").read_text())["sampler"] == "conceptflow_m"
    for row in listing:
        for file in (row["file"], row["plain_file"], *row["attention"].values()):
            with Image.open(project / "data/generated/dog+cat" / file) as image:
                assert image.size == (64, 64)
        assert set(row["attention"]) == {"dog", "cat"}
    report = (project / "data/report/index.html").read_text()
    assert report.count("<img") >= 4 * 4 + 10 + 10  # (ConceptFlow-M, plain, 2 maps) per image, photos, masks
    assert "plain fused" in report and "&lt;cat&gt; attention" in report
    metrics = json.loads((project / "data/metrics/dog+cat/metrics.json").read_text())
    assert set(metrics["plain"]) >= {"clip_t", "dino"} and metrics["overall"]["dino"] is not None
    assert "a &lt;dog&gt; and a &lt;cat&gt; on the grass" in report
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True,
                            text=True, check=True)
    assert json.loads(status.stdout or "{}") == {}
    assert any((project / ".dvc-remote").rglob("*")), "dvc push sent nothing to the local remote"


def test_conceptflow_s_concept_exports_to_lycoris(project, first_run):
    from safetensors.torch import load_file

    run_cli(project, "export-lycoris", "data/adapters/cat", "cat_lokr.safetensors")
    keys = load_file(str(project / "cat_lokr.safetensors")).keys()
    assert {key.rsplit(".", 1)[1] for key in keys} == {"lokr_w1", "lokr_w2", "alpha", "dora_scale"}
    assert len(keys) == 4 * 56  # every linear of every UNet attention module of the tiny base


def test_registry_holds_versions_with_lineage(project, first_run):
    from conceptflow.registry import lookup

    uri = f"sqlite:///{project / 'mlruns.db'}"
    catalog = yaml.safe_load((project / "catalog.yaml").read_text())
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    for name in ("dog", "cat"):
        version = lookup(uri, f"concept.{name}", "champion")
        tags = version["tags"]
        assert tags["dvc.images.md5"] == lock[f"ingest@{name}"]["outs"][0]["md5"]
        assert tags["dvc.masks.md5"] == lock[f"mask@{name}"]["outs"][0]["md5"]
        assert tags["dvc.adapter.md5"] == lock[f"train@{name}"]["outs"][0]["md5"]
        assert tags["git_revision"].startswith(head)
        assert tags["base_model"] == "embedded:tiny-sd" and len(tags["base_model_hash"]) == 32
        assert tags["config_hash"] and tags["method"] == catalog["concepts"][name]["train"]["method"]
    combo = lookup(uri, "combo.dog+cat", "champion")
    assert combo["tags"]["dvc.fused.md5"] == lock["fuse@dog+cat"]["outs"][0]["md5"]
    assert combo["tags"]["concept.dog.version"] == "1"


def test_second_run_redoes_nothing(project, first_run):
    adapter = project / "data/adapters/dog/adapter.safetensors"
    before = adapter.stat().st_mtime_ns
    second = run_cli(project, "run", "--catalog", "catalog.yaml")
    summary = json.loads(second.stdout[second.stdout.index("{"):])
    assert summary["ran"] == []
    assert adapter.stat().st_mtime_ns == before
    assert summary["registered"] == ["concept.dog v1", "concept.cat v1", "combo.dog+cat v1"]
    assert summary["dvc_status_clean"] is True


@pytest.fixture
def postgres_database():
    """A fresh PostgreSQL database on the local server (trust auth), dropped afterwards."""
    import uuid

    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=3)
    except psycopg2.OperationalError as error:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {error}")
    admin.autocommit = True
    name = f"conceptflow_prefect_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_server_mode_on_postgres_with_dask_fan_out(project, first_run, postgres_database, monkeypatch):
    """A real Prefect server on PostgreSQL; tasks fan out to Dask worker processes."""
    from flows.server import prefect_server

    with prefect_server(postgres_database) as api_url:
        monkeypatch.setenv("PREFECT_API_URL", api_url)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MLFLOW_TRACKING_URI", None)
        result = subprocess.run([*CLI, "run", "--catalog", "catalog.yaml", "--runner", "dask"], cwd=project, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        summary = json.loads(result.stdout[result.stdout.index("{"):])
        assert summary["ran"] == [] and len(summary["up_to_date"]) == 9
        import urllib.request

        request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            runs = json.loads(response.read())
        assert [run["state_type"] for run in runs] == ["COMPLETED"]
