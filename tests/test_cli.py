"""The CLI: user errors print one line naming the file/field and exit 2, without a traceback."""

from typer.testing import CliRunner

from conceptflow.cli import app

runner = CliRunner()


def test_missing_catalog_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["ingest", "--catalog", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "not found" in result.output and "Traceback" not in result.output


def test_unknown_concept_and_bad_image(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "broken.jpg").write_bytes(b"not an image")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("concepts:\n  dog: {class_word: dog, images: photos}\n")
    result = runner.invoke(app, ["ingest", "--catalog", str(catalog), "--concept", "cat"])
    assert result.exit_code == 2 and "no concept named 'cat'" in result.output
    result = runner.invoke(app, ["ingest", "--catalog", str(catalog)])
    assert result.exit_code == 2 and "broken.jpg" in result.output and "Traceback" not in result.output


def test_stage_reports_up_to_date_on_second_call(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(photos / "a.png")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("resolution: 32\nconcepts:\n  dog: {class_word: dog, images: photos}\n")
    first = runner.invoke(app, ["ingest", "--catalog", str(catalog)])
    second = runner.invoke(app, ["ingest", "--catalog", str(catalog)])
    assert first.exit_code == 0 and " done " in first.output
    assert second.exit_code == 0 and "up to date" in second.output
    Image.new("RGB", (40, 40), (10, 200, 10)).save(photos / "b.png")  # new photo: ingest again
    third = runner.invoke(app, ["ingest", "--catalog", str(catalog)])
    assert " done " in third.output


def test_importing_the_project_writes_no_environment():
    """Tool defaults are the entry points' job (the CLI's callback), never an import's side effect."""
    import subprocess
    import sys

    code = ("import os; before = dict(os.environ)\n"
            "import conceptflow.cli, conceptflow.registry, conceptflow.stages.register, flows.catalog, flows.server\n"
            "import flows.schedule, tasks.stages\n"
            "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
            "print(changed); assert not [k for k in changed if k.startswith(('MLFLOW_', 'PREFECT_'))], changed")
    env = {key: value for key, value in __import__("os").environ.items()
           if not key.startswith(("MLFLOW_", "PREFECT_"))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_cli_sets_tool_defaults_without_overriding(tmp_path, monkeypatch):
    import os

    from conceptflow.tool_env import MLFLOW_DEFAULTS, prefect_defaults

    monkeypatch.chdir(tmp_path)
    for name in [*MLFLOW_DEFAULTS, *prefect_defaults()]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG")
    result = runner.invoke(app, ["ingest", "--catalog", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["PREFECT_HOME"] == str(tmp_path / ".prefect")
    assert os.environ["PREFECT_LOGGING_LEVEL"] == "DEBUG"  # a value already set wins
