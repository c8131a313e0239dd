"""The whole pipeline through `conceptflow run` (Prefect ephemeral, DVC, MLflow sqlite) on the
default catalog (the toy base and toy concepts), in a fresh git repository holding a copy of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "conceptflow.cli"]
DEFAULT = yaml.safe_load((ROOT / "catalog.yaml").read_text())
FIRST, SECOND = list(DEFAULT["concepts"])[:2]  # the default catalog trains FIRST with ED-LoRA, SECOND with ConceptFlow-S
COMBO = next(iter(DEFAULT["combinations"]))


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
    assert catalog["concepts"][FIRST]["train"]["method"] == "edlora"
    assert catalog["concepts"][SECOND]["train"]["method"] == "conceptflow_s"
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
    assert f"train:{FIRST}" in summary["ran"] and f"generate:{COMBO}" in summary["ran"]
    generated = project / "data/generated" / COMBO
    listing = json.loads((generated / "images.json").read_text())["images"]
    assert len(listing) == 4  # 2 prompts x 2 seeds
    assert json.loads((generated / "images.json").read_text())["sampler"] == "conceptflow_m"
    for row in listing:
        for file in (row["file"], row["plain_file"], *row["attention"].values()):
            with Image.open(generated / file) as image:
                assert image.size == (64, 64)
        assert set(row["attention"]) == {FIRST, SECOND}
    report = (project / "data/report/index.html").read_text()
    assert report.count("<img") >= 4 * 4 + 10 + 10  # (ConceptFlow-M, plain, 2 maps) per image, photos, masks
    assert "plain fused" in report and f"&lt;{SECOND}&gt; attention" in report
    metrics = json.loads((project / "data/metrics" / COMBO / "metrics.json").read_text())
    assert set(metrics["plain"]) >= {"clip_t", "dino"} and metrics["overall"]["dino"] is not None
    assert f"a &lt;{FIRST}&gt; and a &lt;{SECOND}&gt;" in report
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True,
                            text=True, check=True)
    assert json.loads(status.stdout or "{}") == {}
    assert any((project / ".dvc-remote").rglob("*")), "dvc push sent nothing to the local remote"


def test_conceptflow_s_concept_exports_to_lycoris(project, first_run):
    from safetensors.torch import load_file

    from conceptflow.models.loading import load_base_pipeline

    # the default catalog's ConceptFlow-S concept normalises rows: its LoKr form is 'lycoris-rows'
    run_cli(project, "export", SECOND, "--format", "lycoris-rows", "--out", "lokr.safetensors")
    keys = load_file(str(project / "lokr.safetensors")).keys()
    assert {key.rsplit(".", 1)[1] for key in keys} == {"lokr_w1", "lokr_w2", "alpha", "dora_scale"}
    unet = load_base_pipeline(str(project / DEFAULT["base_model"])).unet
    attention_linears = [name for name, module in unet.named_modules()
                         if isinstance(module, torch.nn.Linear) and ".attn" in name]
    assert len(keys) == 4 * len(attention_linears)  # every linear of every UNet attention module


def test_registry_holds_versions_with_lineage(project, first_run):
    from conceptflow.registry import lookup

    uri = f"sqlite:///{project / 'mlruns.db'}"
    catalog = yaml.safe_load((project / "catalog.yaml").read_text())
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    for name in (FIRST, SECOND):
        version = lookup(uri, f"concept.{name}", "champion")
        tags = version["tags"]
        assert tags["dvc.images.md5"] == lock[f"ingest@{name}"]["outs"][0]["md5"]
        assert tags["dvc.masks.md5"] == lock[f"mask@{name}"]["outs"][0]["md5"]
        assert tags["dvc.adapter.md5"] == lock[f"train@{name}"]["outs"][0]["md5"]
        assert tags["git_revision"].startswith(head)
        assert tags["base_model"] == DEFAULT["base_model"] and len(tags["base_model_hash"]) == 32
        assert tags["config_hash"] and tags["method"] == catalog["concepts"][name]["train"]["method"]
    combo = lookup(uri, f"combo.{COMBO}", "champion")
    assert combo["tags"]["dvc.fused.md5"] == lock[f"fuse@{COMBO}"]["outs"][0]["md5"]
    assert combo["tags"][f"concept.{FIRST}.version"] == "1"


def test_second_run_redoes_nothing(project, first_run):
    adapter = project / f"data/adapters/{FIRST}/adapter.safetensors"
    before = adapter.stat().st_mtime_ns
    second = run_cli(project, "run", "--catalog", "catalog.yaml")
    summary = json.loads(second.stdout[second.stdout.index("{"):])
    assert summary["ran"] == []
    assert adapter.stat().st_mtime_ns == before
    assert summary["registered"] == [f"concept.{FIRST} v1", f"concept.{SECOND} v1", f"combo.{COMBO} v1"]
    assert summary["dvc_status_clean"] is True
    # Nothing changed since a complete run: the flow is not started (conceptflow/stages/run_record.py).
    assert "the flow was not started" in summary["shortcut"]
    assert sorted(summary["up_to_date"]) == sorted(json.loads(
        (project / ".conceptflow/last_run.json").read_text())["summary"]["ran"])


def test_a_changed_photo_or_registry_file_means_the_flow_runs_again(project, first_run, monkeypatch):
    """The shortcut is taken only when every input it covers is as the last complete run left it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the CLI runs see the project's SQLite store
    from conceptflow.config import load_catalog
    from conceptflow.stages.run_record import unchanged_summary

    catalog_path = project / "catalog.yaml"
    catalog = load_catalog(catalog_path)
    assert unchanged_summary(catalog, catalog_path, None) is not None
    assert unchanged_summary(catalog, catalog_path, "fused") is None  # another sampler: not what ran
    caption = sorted((project / DEFAULT["concepts"][FIRST]["images"]).glob("*.txt"))[0]
    text = caption.read_text()
    caption.write_text(text + " ")
    try:
        assert unchanged_summary(catalog, catalog_path, None) is None  # ingest of FIRST is no longer up to date
    finally:
        caption.write_text(text)
    assert unchanged_summary(catalog, catalog_path, None) is not None

    from conceptflow.stages.run_record import unchanged_registrations

    versions = {f"concept.{FIRST}": "1", f"concept.{SECOND}": "1", f"combo.{COMBO}": "1"}
    assert unchanged_registrations(catalog) == versions  # registration may reuse them: nothing changed
    adapter_manifest = project / f"data/adapters/{FIRST}/.manifest.json"
    manifest_text = adapter_manifest.read_text()
    adapter_manifest.write_text(manifest_text.replace('"md5": "', '"md5": "0', 1))  # as if retrained
    try:
        assert unchanged_registrations(catalog) == {k: v for k, v in versions.items() if k != f"concept.{FIRST}"}
    finally:
        adapter_manifest.write_text(manifest_text)

    registry = project / "mlruns.db"
    stat = registry.stat()
    os.utime(registry, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the store changed since
    assert unchanged_registrations(catalog) == {}  # so every item is looked up again
    rerun = json.loads((lambda out: out[out.index("{"):])(run_cli(project, "run", "--catalog", "catalog.yaml").stdout))
    assert "shortcut" not in rerun and rerun["ran"] == []  # the flow ran (registration re-checked), redid nothing
    assert rerun["registered"] == [f"concept.{FIRST} v1", f"concept.{SECOND} v1", f"combo.{COMBO} v1"]
    assert unchanged_summary(catalog, catalog_path, None) is not None  # recorded again
    assert unchanged_registrations(catalog) == versions


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
