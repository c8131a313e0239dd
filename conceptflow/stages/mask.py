"""Stage 2: a foreground mask per ingested image."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from conceptflow.config import Catalog
from conceptflow.data.ingest import ingested_images
from conceptflow.data.masks import get_mask_backend
from conceptflow.data.masks.ground_truth import ground_truth_masks
from conceptflow.errors import CatalogError
from conceptflow.layout import Layout
from conceptflow.stages.base import run_stage
from conceptflow.stages.table import stage, upstream_md5s


def _save(mask: np.ndarray, path) -> None:
    Image.fromarray((np.clip(mask, 0, 1) * 255).round().astype(np.uint8), mode="L").save(path)


def mask(catalog: Catalog, concept_name: str, force: bool = False):
    concept = catalog.concept(concept_name)
    layout = Layout(catalog)
    upstream = upstream_md5s(catalog, "mask", concept_name)  # {"images": md5}

    def produce(staging):
        images = ingested_images(layout.images(concept_name))
        if catalog.mask.backend == "ground_truth":
            if concept.masks is None:
                raise CatalogError(f"concepts.{concept_name}: mask.backend is ground_truth but the concept has no "
                                   "`masks:` folder (a group's concepts: the group's `masks:`): add one, or use "
                                   "another mask.backend")
            given = ground_truth_masks(layout.images(concept_name), catalog.path(concept.masks), catalog.resolution)
            coverage = []
            for path in images:
                _save(given[path.name], staging / path.name)
                coverage.append(float(np.mean(given[path.name])))
            return {"params": {"backend": "ground_truth", "backend.masks": str(concept.masks)},
                    "metrics": {"mean_foreground": float(np.mean(coverage))}}
        backend = get_mask_backend(catalog.mask, device=catalog.device, root=catalog.root)
        coverage = []
        for path in tqdm(images, desc=f"mask {concept_name}", leave=False):
            with Image.open(path) as opened:
                probabilities = backend.predict(opened.convert("RGB"), concept.class_word)
            coverage.append(float(np.mean(probabilities)))
            _save(probabilities, staging / path.name)
        return {"params": {"backend": backend.name, **{f"backend.{k}": str(v) for k, v in backend.describe().items()}},
                "metrics": {"mean_foreground": float(np.mean(coverage))}}

    row = stage("mask")
    return run_stage(row.name, concept_name, row.folder(catalog, concept_name), row.config_hash(catalog, concept_name),
                     upstream, produce, force)
