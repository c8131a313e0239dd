"""Stage 5: sample the combination's prompts from its fused model (or, for a sampler that keeps
concepts apart, from their separate adapters), a fixed seed per image."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from conceptflow.config import Catalog
from conceptflow.fileio import write_json_atomic
from conceptflow.plots import save_heatmap
from conceptflow.sample.core import SampleRequest
from conceptflow.stages.base import run_stage
from conceptflow.stages.combination_model import sample_combination
from conceptflow.stages.table import generate_settings, stage, upstream_md5s


def generate(catalog: Catalog, combination_name: str, sampler: str | None = None, force: bool = False):
    combination = catalog.combination(combination_name)
    settings = generate_settings(catalog, sampler)
    upstream = upstream_md5s(catalog, "generate", combination_name)  # {"fused": md5}
    layout_image = None if combination.layout_image is None else catalog.path(combination.layout_image)
    requests = [SampleRequest(prompt, seed, combination.layout, layout_image)
                for prompt in combination.prompts for seed in combination.seeds]

    def produce(staging):
        result = sample_combination(catalog, combination_name, settings, requests, f"generate {combination_name}")
        images, plain = result.images, result.plain_images
        maps = result.attention_maps or [None] * len(requests)
        masks = result.masks or [None] * len(requests)
        records = []
        for index, (request, image) in enumerate(zip(requests, images)):
            record = {"file": f"{index:03d}.png", "prompt": request.prompt, "seed": request.seed}
            image.save(staging / record["file"])
            if plain is not None:  # the same prompt and seed from the plain fused sampler, for comparison
                record["plain_file"] = f"plain/{index:03d}.png"
                (staging / "plain").mkdir(exist_ok=True)
                plain[index].save(staging / record["plain_file"])
            if maps[index]:
                record["attention"] = {}
                for concept_name, attention in maps[index].items():
                    record["attention"][concept_name] = f"attention/{index:03d}_{concept_name}.png"
                    save_heatmap(attention, staging / record["attention"][concept_name], catalog.resolution)
            if masks[index]:  # the sampler's final per-concept masks (Concept Conductor's refined masks)
                record["masks"] = {}
                for concept_name, concept_mask in masks[index].items():
                    record["masks"][concept_name] = f"masks/{index:03d}_{concept_name}.png"
                    save_heatmap(concept_mask, staging / record["masks"][concept_name], catalog.resolution)
            records.append(record)
        write_json_atomic(staging / "images.json", {"sampler": settings.sampler, "images": records})
        return {"params": {"sampler": settings.sampler, "steps": settings.steps, "guidance_scale": settings.guidance_scale,
                           "batch_size": settings.batch_size, "prompts": len(combination.prompts),
                           "seeds": ",".join(map(str, combination.seeds))},
                "metrics": {"images": float(len(records))}}

    row = stage("generate")
    return run_stage(row.name, combination_name, row.folder(catalog, combination_name),
                     row.config_hash(catalog, combination_name, sampler=sampler), upstream, produce, force)


def generated_images(folder: Path, key: str = "file") -> list[tuple[Image.Image, str]] | None:
    """(RGB image, prompt) for each row of ``folder/images.json``, reading the row's ``key``
    ("file", or "plain_file" for the plain fused images beside ConceptFlow-M's); None when the
    rows have no such images."""
    rows = json.loads((Path(folder) / "images.json").read_text())["images"]
    if not all(row.get(key) for row in rows):
        return None
    pairs = []
    for row in rows:
        with Image.open(Path(folder) / row[key]) as opened:
            pairs.append((opened.convert("RGB"), row["prompt"]))
    return pairs
