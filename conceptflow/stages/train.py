"""Stage 3: train one concept's adapter with the method its catalog entry names."""

from __future__ import annotations

import hashlib
import shutil

import torch

from conceptflow.adapters.concept_io import save_adapter
from conceptflow.attention.processor import enable_hooked_gradient_checkpointing
from conceptflow.config import Catalog
from conceptflow.data.ingest import ingested_captions, ingested_images
from conceptflow.layout import Layout
from conceptflow.methods import get_method
from conceptflow.models.loading import load_base_pipeline, model_fingerprint
from conceptflow.plots import save_curve
from conceptflow.stages.base import flat_params, run_stage
from conceptflow.stages.table import stage, upstream_md5s
from conceptflow.train.common import prepare_concept_training
from conceptflow.train.loop import run_training
from conceptflow.train.precision import Precision, base_dtype_name, trainable_in_float32


def train_method(catalog: Catalog, setup, config, checkpoints, run_key: str, what: str,
                 stop_after: int | None = None):
    """Build ``config``'s method on ``setup`` and run its training (resumed from ``checkpoints``);
    returns the method and its loss history. ``stop_after`` stops early (InterruptedError)."""
    if config.gradient_checkpointing:
        enable_hooked_gradient_checkpointing(setup.unet)
    method = get_method(config.method).build_trainer(setup, config, device=catalog.device)
    trainable_in_float32(p for group in method.parameter_groups() for p in group["params"])
    history = run_training(method, config.steps, catalog.seed, checkpoints, run_key, config.checkpoint_every,
                           config.log_every, description=f"train {what}", stop_after=stop_after,
                           precision=Precision(config.mixed_precision, torch.device(catalog.device).type))
    if stop_after is not None and stop_after < config.steps:
        raise InterruptedError(f"training of {what} stopped at step {stop_after} on request")
    return method, history


def train(catalog: Catalog, concept_name: str, force: bool = False, stop_after: int | None = None):
    concept = catalog.concept(concept_name)
    if concept.group is not None:  # learnt with its group's other concepts, from the group's photos
        from conceptflow.stages.train_group import train_group_concept

        return train_group_concept(catalog, concept_name, force, stop_after)
    layout = Layout(catalog)
    upstream = upstream_md5s(catalog, "train", concept_name)  # {"images": md5, "masks": md5}
    base_hash = model_fingerprint(catalog.base_model_source)  # memoised: the config hash below reads it too
    row = stage("train")
    settings_hash = row.config_hash(catalog, concept_name)
    run_key = hashlib.sha256(f"{settings_hash}{sorted(upstream.items())}".encode()).hexdigest()[:16]
    config = concept.train

    def produce(staging):
        torch.manual_seed(catalog.seed)
        pipeline = load_base_pipeline(catalog.base_model_source, catalog.device,
                                      base_dtype_name(config.mixed_precision, catalog.dtype))
        image_paths = ingested_images(layout.images(concept_name))
        setup = prepare_concept_training(
            pipeline, concept_name, concept.class_word, image_paths, ingested_images(layout.masks(concept_name)),
            catalog.resolution, catalog.seed, ingested_captions(image_paths))
        method, history = train_method(catalog, setup, config, layout.checkpoints(concept_name), run_key,
                                       concept_name, stop_after)
        tensors, method_meta = method.export()
        meta = {
            "kind": "concept", "name": concept_name, "method": config.method, "class_word": concept.class_word,
            "tokens": list(concept.tokens), "layer_tokens": setup.token_strings, "n_layers": setup.n_layers,
            "base_model": catalog.base_model, "base_model_hash": base_hash, "resolution": catalog.resolution,
            "seed": catalog.seed, "config": config.model_dump(mode="json"), "config_hash": settings_hash,
            "data": upstream, **method_meta,
        }
        save_adapter(staging, tensors, meta)
        if history:
            save_curve(history, staging / "loss.png", f"{concept_name} ({config.method})")
        return {"params": flat_params("", {"method": config.method, "base_model": catalog.base_model,
                                           **config.model_dump(mode="json")}),
                "metrics": {k: v for k, v in (history[-1] if history else {}).items() if k != "step"},
                "history": history}

    manifest, ran = run_stage(row.name, concept_name, row.folder(catalog, concept_name), settings_hash, upstream,
                              produce, force)
    if ran:
        shutil.rmtree(layout.checkpoints(concept_name), ignore_errors=True)
    return manifest, ran
