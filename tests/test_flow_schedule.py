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
