"""Stage 2: a foreground mask per ingested image."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from conceptflow.config import Catalog
from conceptflow.data.ingest import ingested_images
from conceptflow.data.masks import get_mask_backend
from conceptflow.layout import Layout
from conceptflow.stages.base import run_stage
from conceptflow.stages.table import stage, upstream_md5s


def mask(catalog: Catalog, concept_name: str, force: bool = False):
    concept = catalog.concept(concept_name)
    layout = Layout(catalog)
    upstream = upstream_md5s(catalog, "mask", concept_name)  # {"images": md5}

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

    row = stage("mask")
    return run_stage(row.name, concept_name, row.folder(catalog, concept_name), row.config_hash(catalog, concept_name),
                     upstream, produce, force)
