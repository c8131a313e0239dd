"""Stage 6: score a combination's generated images against the concepts' own photos, and (with
``evaluate.attention_entropy``) the fused model's attention-entropy change while sampling."""

from __future__ import annotations

from PIL import Image

from conceptflow.config import Catalog
from conceptflow.data.ingest import ingested_images
from conceptflow.fileio import write_json_atomic
from conceptflow.layout import Layout
from conceptflow.sample.core import SampleRequest
from conceptflow.stages.base import require_manifest, run_stage
from conceptflow.stages.combination_model import CombinationModel
from conceptflow.stages.generate import generated_images
from conceptflow.stages.table import generate_settings, stage, upstream_md5s


def _open(path):
    with Image.open(path) as opened:
        return opened.convert("RGB")


def entropy_changes(catalog: Catalog, combination_name: str) -> list[dict[str, float]]:
    """Each image's per-concept ΔH (``metrics.attention_entropy``) in a plain sampling run of the
    combination's fused model, with the generate stage's prompts, seeds, steps and guidance (none
    with fewer than two steps)."""
    from conceptflow.metrics.attention_entropy import sampling_entropy_changes

    combination, settings = catalog.combination(combination_name), generate_settings(catalog)
    if settings.steps < 2:  # ΔH is a change between steps: a one-step run has none (the score is None)
        return []
    require_manifest(Layout(catalog).fused(combination_name), "fused model (the attention-entropy run samples it; "
                     "or set evaluate.attention_entropy: false)", f"fuse --combination {combination_name}")
    model = CombinationModel(catalog, combination_name, "fused")
    requests = [SampleRequest(prompt, seed) for prompt in combination.prompts for seed in combination.seeds]
    with model.runtime():
        return sampling_entropy_changes(model.core, requests, combination.concepts, catalog.resolution,
                                        settings.steps, settings.guidance_scale, settings.batch_size)


def add_entropy_scores(scores: dict, changes: list[dict[str, float]]) -> None:
    """``attention_entropy_change`` into ``scores``' overall and per-concept rows (means over images)."""
    pooled = [value for image in changes for value in image.values()]
    scores["overall"]["attention_entropy_change"] = sum(pooled) / len(pooled) if pooled else None
    for name, row in scores["per_concept"].items():
        values = [image[name] for image in changes if name in image]
        row["attention_entropy_change"] = sum(values) / len(values) if values else None


def evaluate(catalog: Catalog, combination_name: str, force: bool = False):
    from conceptflow.metrics.evaluate import evaluate_images, flatten_metrics, load_metric_encoders

    combination = catalog.combination(combination_name)
    layout = Layout(catalog)
    upstream = upstream_md5s(catalog, "evaluate", combination_name)  # {"generated": md5, "images.<concept>": md5}

    def produce(staging):
        images = generated_images(layout.generated(combination_name))
        reference_images = {name: [_open(p) for p in ingested_images(layout.images(name))] for name in combination.concepts}
        class_words = {name: catalog.concept(name).class_word for name in combination.concepts}
        if catalog.evaluate.toy_evaluators:
            from conceptflow.toy.evaluators import toy_metric_encoders

            encoders = toy_metric_encoders(catalog.resolve_path(catalog.evaluate.toy_evaluators), catalog.device)
        else:
            encoders = load_metric_encoders(catalog.evaluate, catalog.device)
        scores = evaluate_images(images, reference_images, class_words, catalog.evaluate, device=catalog.device,
                                 encoders=encoders)
        plain = generated_images(layout.generated(combination_name), "plain_file")  # same prompts and seeds
        if plain is not None:
            scores["plain"] = evaluate_images(plain, reference_images, class_words, catalog.evaluate,
                                              device=catalog.device, encoders=encoders)["overall"]
        if catalog.evaluate.attention_entropy:
            add_entropy_scores(scores, entropy_changes(catalog, combination_name))
        write_json_atomic(staging / "metrics.json", scores)
        flat = flatten_metrics(scores)
        flat.update({f"plain/{key}": float(value) for key, value in scores.get("plain", {}).items() if value is not None})
        return {"params": {"clip_model": catalog.evaluate.clip_model, "dino_model": catalog.evaluate.dino_model},
                "metrics": flat}

    row = stage("evaluate")
    return run_stage(row.name, combination_name, row.folder(catalog, combination_name),
                     row.config_hash(catalog, combination_name), upstream, produce, force)

