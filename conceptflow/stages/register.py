"""After the stages (no stage-table row: it writes no folder of its own): log every stage output to
MLflow and register concept and combination versions.

Lineage tags say exactly what made a version: the DVC md5s of its data (from dvc.lock), the
config hash, the git revision and the base model (id and content hash); a combination also
names the registered versions of the concepts it fused. Logging is idempotent (a stage output
already logged, or a version already registered, is found by its md5), so a run with nothing
changed adds nothing to the registry.

Each version's source is the MLflow pyfunc model of its adapter or fused folder
(``conceptflow.serving.pyfunc``, logged under the run's ``pyfunc/``, once per run): it loads
with ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and carries what
``conceptflow sample --model`` needs (``serving.spec.ServingSpec``); the stage folder itself
stays under ``output/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from conceptflow.config import Catalog
from conceptflow.layout import Layout
from conceptflow.lineage import git_revision, locked_output_md5s
from conceptflow.models.loading import model_fingerprint
from conceptflow.stages.base import require_manifest
from conceptflow.stages.table import STAGES


def _relative(layout: Layout, folder: Path) -> str:
    return folder.relative_to(layout.root).as_posix()


# A lineage label (the Layout name of a stage's output: "images", "adapter", ...) -> the stage that makes it.
STAGE_OF = {row.layout: row.name for row in STAGES if row.fan_out != "catalog"}


def _lineage_of(layout: Layout, locked: dict, folders: dict[str, Path]) -> dict[str, str]:
    lineage = {}
    for label, folder in folders.items():
        manifest = require_manifest(folder, label, STAGE_OF[label])
        lineage[f"dvc.{label}.md5"] = locked.get(_relative(layout, folder), manifest.md5)
    return lineage


def _config_tag(catalog: Catalog, stage_name: str, item: str) -> str:
    """The stage's resolved config slice as JSON ({catalog key: value}; the base model's file
    fingerprint under ``base_model_fingerprint``): what its config hash covers, readable back
    (``conceptflow lineage``, ``conceptflow reproduce``)."""
    from pydantic import BaseModel

    from conceptflow.stages.table import stage

    return json.dumps({part.key or "base_model_fingerprint":
                       part.value.model_dump(mode="json", exclude={"root"}) if isinstance(part.value, BaseModel)
                       else part.value for part in stage(stage_name).config_slice(catalog, item)}, sort_keys=True)


def _concept_scores(layout: Layout, catalog: Catalog) -> dict[str, float]:
    """A concept's score: its mean DINO identity over the combinations it appears in."""
    collected: dict[str, list[float]] = {}
    for combination in catalog.combinations:
        path = layout.metrics(combination.name) / "metrics.json"
        if not path.is_file():
            continue
        per_concept = json.loads(path.read_text()).get("per_concept", {})
        for name, values in per_concept.items():
            if values.get("dino") is not None:
                collected.setdefault(name, []).append(float(values["dino"]))
    return {name: sum(values) / len(values) for name, values in collected.items()}


def _register_pyfunc(uri: str, catalog: Catalog, kind: str, name: str, run_id: str, folder: Path, lineage: dict,
                     score: float | None) -> tuple[str, bool]:
    """Log ``folder``'s pyfunc model in its run (once) and register it as a version of ``kind.name``."""
    from conceptflow.registry import PYFUNC_PATH, log_model_folder, model_name, register_version
    from conceptflow.serving.pyfunc import save_pyfunc_model
    from conceptflow.serving.spec import spec_for

    log_model_folder(uri, run_id, lambda model_dir: save_pyfunc_model(folder, spec_for(kind, folder, catalog, lineage),
                                                                      model_dir))
    return register_version(uri, model_name(kind, name), run_id, lineage, score=score, higher_is_better=True,
                            artifact_path=PYFUNC_PATH)


def register(catalog: Catalog) -> list[str]:
    """Log and register the whole catalog; retried (it is idempotent) while the MLflow server is
    unreachable, then a RegistryError naming its URI (``registry.with_server_retries``)."""
    from conceptflow.registry import tracking_uri, with_server_retries

    return with_server_retries(tracking_uri(Layout(catalog).root), lambda: _register_all(catalog))


def _register_all(catalog: Catalog) -> list[str]:
    from conceptflow.registry import log_stage_run, model_name, tracking_uri
    from conceptflow.stages.run_record import unchanged_registrations

    layout = Layout(catalog)
    # Items as the last complete run registered them, in a store untouched since: their versions as
    # recorded, without looking each run and version up again (conceptflow/stages/run_record.py).
    reused = unchanged_registrations(catalog)
    uri = tracking_uri(layout.root)
    locked = locked_output_md5s(layout.root)
    common = {"git_revision": git_revision(layout.root), "base_model": catalog.base_model,
              "base_model_hash": model_fingerprint(catalog.base_model_source), "catalog": catalog.project}
    scores = _concept_scores(layout, catalog)
    lines, concept_versions = [], {}

    for concept in catalog.concepts:
        name = concept.name
        registered = model_name("concept", name)
        if registered in reused:
            concept_versions[name] = reused[registered]
            lines.append(f"{registered} v{reused[registered]}")
            continue
        folders = {"images": layout.images(name), "masks": layout.masks(name), "adapter": layout.adapter(name)}
        lineage = {**common, **_lineage_of(layout, locked, folders), "method": concept.train.method,
                   "config_hash": require_manifest(folders["adapter"], "adapter", STAGE_OF["adapter"]).config_hash,
                   "config.train": _config_tag(catalog, "train", name)}
        for label in ("images", "masks"):
            log_stage_run(uri, catalog.project, folders[label],
                          {**lineage, "artifact.md5": lineage[f"dvc.{label}.md5"]}, log_artifacts=True)
        run_id = log_stage_run(uri, catalog.project, folders["adapter"],
                               {**lineage, "artifact.md5": lineage["dvc.adapter.md5"]}, log_artifacts=True)
        registered = model_name("concept", name)
        version, moved = _register_pyfunc(uri, catalog, "concept", name, run_id, folders["adapter"],
                                          {**lineage, "artifact.md5": lineage["dvc.adapter.md5"]}, scores.get(name))
        concept_versions[name] = version
        lines.append(f"{registered} v{version}{' (champion)' if moved else ''}")

    for combination in catalog.combinations:
        name = combination.name
        registered = model_name("combo", name)
        if registered in reused and all(model_name("concept", c) in reused for c in combination.concepts):
            lines.append(f"{registered} v{reused[registered]}")
            continue
        folders = {"fused": layout.fused(name), "generated": layout.generated(name), "metrics": layout.metrics(name)}
        lineage = {**common, **_lineage_of(layout, locked, folders),
                   "config_hash": require_manifest(folders["fused"], "fused", STAGE_OF["fused"]).config_hash,
                   "config.fuse": _config_tag(catalog, "fuse", name),
                   **{f"concept.{c}.version": concept_versions[c] for c in combination.concepts},
                   **{f"concept.{c}.dvc.adapter.md5": locked.get(_relative(layout, layout.adapter(c)), "")
                      for c in combination.concepts}}
        run_ids = {label: log_stage_run(uri, catalog.project, folder, {**lineage, "artifact.md5": lineage[f"dvc.{label}.md5"]})
                   for label, folder in folders.items()}
        metrics = json.loads((folders["metrics"] / "metrics.json").read_text())
        score = (metrics.get("overall") or {}).get("dino")
        registered = model_name("combo", name)
        version, moved = _register_pyfunc(uri, catalog, "combo", name, run_ids["fused"], folders["fused"],
                                          {**lineage, "artifact.md5": lineage["dvc.fused.md5"]}, score)
        lines.append(f"{registered} v{version}{' (champion)' if moved else ''}")
    return lines
