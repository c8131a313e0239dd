"""Stage 2: a foreground mask per ingested image."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from conceptflow.config import Catalog, config_hash
from conceptflow.data.ingest import ingested_images
from conceptflow.data.masks import get_mask_backend
from conceptflow.layout import Layout
from conceptflow.stages.base import require_manifest, run_stage


def mask(catalog: Catalog, concept_name: str, force: bool = False):
    concept = catalog.concept(concept_name)
    layout = Layout(catalog)
    images = require_manifest(layout.images(concept_name), "ingested images", f"ingest --concept {concept_name}")

    def produce(staging):
        backend = get_mask_backend(catalog.mask, device=catalog.device, root=catalog.root)
        coverage = []
        for path in tqdm(ingested_images(layout.images(concept_name)), desc=f"mask {concept_name}", leave=False):
            with Image.open(path) as opened:
                probabilities = backend.predict(opened.convert("RGB"), concept.class_word)
            coverage.append(float(np.mean(probabilities)))
            Image.fromarray((np.clip(probabilities, 0, 1) * 255).round().astype(np.uint8), mode="L").save(staging / path.name)
        return {"params": {"backend": backend.name, **{f"backend.{k}": str(v) for k, v in backend.describe().items()}},
                "metrics": {"mean_foreground": float(np.mean(coverage))}}

    return run_stage("mask", concept_name, layout.masks(concept_name), config_hash(catalog.mask, concept.class_word),
                     {"images": images.md5}, produce, force)
