"""One Prefect task per stage and item; they exchange manifests (paths + hashes), not tensors.

Caching is the stages' own: a stage whose output already carries the manifest key it would
produce (input hashes + config hash + code version) is skipped. Prefect's result cache is
off (NO_CACHE) because it cannot see an artifact deleted or changed on disk; the manifest
check can. Transient failures retry; user errors (ConceptflowError) do not.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from conceptflow.config import load_catalog
from conceptflow.errors import ConceptflowError


def _retry_unless_user_error(task_definition, task_run, state) -> bool:
    try:
        state.result()
    except ConceptflowError:
        return False
    except Exception:
        return True
    return False


def _stage_task(name: str, retries: int = 1):
    return task(name=name, retries=retries, retry_delay_seconds=2, cache_policy=NO_CACHE,
                retry_condition_fn=_retry_unless_user_error, task_run_name=f"{name} {{item}}")


def _summary(result) -> dict:
    manifest, ran = result
    return {"stage": manifest.stage, "name": manifest.name, "path": str(manifest.path), "md5": manifest.md5,
            "key": manifest.key, "ran": ran}


@_stage_task("ingest")
def ingest_task(catalog_path: str, item: str) -> dict:
    """Validate and normalise one concept's photos."""
    from conceptflow.stages.ingest import ingest

    return _summary(ingest(load_catalog(catalog_path), item))


@_stage_task("mask")
def mask_task(catalog_path: str, item: str) -> dict:
    """Foreground masks for one concept."""
    from conceptflow.stages.mask import mask

    return _summary(mask(load_catalog(catalog_path), item))


@_stage_task("train")
def train_task(catalog_path: str, item: str) -> dict:
    """Train one concept's adapter (resumes from its checkpoint after a crash)."""
    from conceptflow.stages.train import train

    return _summary(train(load_catalog(catalog_path), item))


@_stage_task("fuse")
def fuse_task(catalog_path: str, item: str) -> dict:
    """Fuse one combination's adapters."""
    from conceptflow.stages.fuse import fuse

    return _summary(fuse(load_catalog(catalog_path), item))


@_stage_task("generate")
def generate_task(catalog_path: str, item: str, sampler: str | None = None) -> dict:
    """Sample one combination's prompts."""
    from conceptflow.stages.generate import generate

    return _summary(generate(load_catalog(catalog_path), item, sampler=sampler))


@_stage_task("evaluate")
def evaluate_task(catalog_path: str, item: str) -> dict:
    """Score one combination's images."""
    from conceptflow.stages.evaluate import evaluate

    return _summary(evaluate(load_catalog(catalog_path), item))


@_stage_task("report", retries=0)
def report_task(catalog_path: str, item: str = "report") -> dict:
    """Write the HTML report."""
    from conceptflow.stages.report import report

    return _summary(report(load_catalog(catalog_path)))


@_stage_task("dvc-record")
def record_task(catalog_path: str, item: str = "dvc") -> dict:
    """dvc commit + push of every stage output; returns the locked md5s."""
    from conceptflow.lineage import dvc_status_clean, locked_output_md5s, record_outputs

    root = load_catalog(catalog_path).root
    record_outputs(root)
    return {"clean": dvc_status_clean(root), "outputs": locked_output_md5s(root)}


@_stage_task("register")
def register_task(catalog_path: str, item: str = "mlflow") -> list[str]:
    """Log stages to MLflow and register versions with lineage."""
    from conceptflow.stages.register import register

    return register(load_catalog(catalog_path))
