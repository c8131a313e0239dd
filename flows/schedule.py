"""Scheduled catalog retraining: a Prefect deployment of the catalog flow on a cron schedule.

Each scheduled run is the same flow as `conceptflow run`; the stages' manifests make it redo
only what changed (new photos, a changed config, a new base model), so a weekly retrain of an
unchanged catalog costs a few seconds.
"""

from __future__ import annotations

from pathlib import Path

from flows.catalog import catalog_flow

DEPLOYMENT_NAME = "catalog-retraining"


def retraining_deployment(catalog_path: str, cron: str, timezone: str = "UTC", sampler: str | None = None):
    """The deployment (not yet served): the catalog flow with its parameters and cron schedule."""
    return catalog_flow.to_deployment(
        name=DEPLOYMENT_NAME,
        cron=cron,
        parameters={"catalog_path": str(Path(catalog_path).resolve()), "sampler": sampler},
        tags=["conceptflow", "retraining"],
        description=f"Retrain the concept catalog {catalog_path} on the schedule {cron} ({timezone}).",
    )


def serve_retraining(catalog_path: str, cron: str, sampler: str | None = None) -> None:  # pragma: no cover - blocks
    """Register the deployment with the Prefect API (PREFECT_API_URL) and run its schedule."""
    from prefect import serve

    serve(retraining_deployment(catalog_path, cron, sampler=sampler))
