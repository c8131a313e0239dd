"""The retraining deployment carries the catalog, its cron schedule and the flow's entry point."""

from flows.schedule import DEPLOYMENT_NAME, retraining_deployment


def test_deployment_schedule_and_parameters(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("concepts: {}\n")
    deployment = retraining_deployment(str(catalog), "0 3 * * 1", sampler="conceptflow_m")
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.parameters == {"catalog_path": str(catalog.resolve()), "sampler": "conceptflow_m"}
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * 1"
    assert deployment.entrypoint.endswith("flows/catalog.py:catalog_flow")


def test_tasks_validate_a_catalog_file_once_per_version(tmp_path, monkeypatch):
    import os

    import tasks.stages as stage_tasks

    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("concepts:\n  dog: {class_word: dog, images: photos}\n")
    loads = []
    real = stage_tasks.load_catalog
    monkeypatch.setattr(stage_tasks, "load_catalog", lambda path: loads.append(path) or real(path))
    first = stage_tasks.catalog_at(str(catalog))
    assert stage_tasks.catalog_at(str(catalog)) is first and len(loads) == 1
    catalog.write_text("concepts:\n  cat: {class_word: cat, images: photos}\n")
    os.utime(catalog, ns=(1, 1))  # a new version even within the file system's mtime granularity
    assert [c.name for c in stage_tasks.catalog_at(str(catalog)).concepts] == ["cat"] and len(loads) == 2


def test_every_stage_table_row_has_a_task():
    from conceptflow.stages.table import STAGES
    from tasks.stages import STAGE_TASKS

    assert list(STAGE_TASKS) == [row.name for row in STAGES]
    assert STAGE_TASKS["report"].retries == 0 and STAGE_TASKS["train"].retries == 1
