"""Stage 3 for a group's concepts: one Textual Localization run learns them all.

The train stage of a group's concept (``stages.train``) calls ``train_group_concept``. The first
of the group's concepts to train runs the joint training (from every member's ingested photos
and masks) and keeps each member's result in ``.cache/groups/<group>/<run key>/<concept>/``;
every member's train stage then copies its own folder from there. The run key hashes what
decides the result for every member alike (the group's settings, the members' class words,
base, seed, resolution, dtype and every member's photos and masks), so the members' stages
find the same run, and a change to any member's photos or masks retrains the group. A file
lock keeps two processes (Dask workers) from training one group twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from conceptflow.adapters.concept_io import EMBEDDING_PREFIX, read_adapter, save_adapter
from conceptflow.config import Catalog
from conceptflow.data.ingest import ingested_captions, ingested_images
from conceptflow.errors import ConceptflowError
from conceptflow.fileio import atomic_directory, write_json_atomic
from conceptflow.layout import Layout
from conceptflow.models.loading import load_base_pipeline, model_fingerprint
from conceptflow.plots import save_curve
from conceptflow.stages.base import flat_params, run_stage
from conceptflow.stages.table import stage, upstream_md5s
from conceptflow.stages.class_images import class_images_key, class_prior_images, prior_pixels
from conceptflow.stages.train import train_method
from conceptflow.train.precision import base_dtype_name

HISTORY_FILE = "history.json"


@contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def group_run_key(catalog: Catalog, group_name: str, upstream: dict[str, str]) -> str:
    group = catalog.group(group_name)
    words = [catalog.concept(member).class_word for member in group.concepts]
    payload = repr([group.model_dump(mode="json"), words, catalog.base_model, model_fingerprint(catalog.base_model_source),
                    catalog.seed, catalog.resolution, catalog.dtype, sorted(upstream.items())])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _train_jointly(catalog: Catalog, group_name: str, run_key: str, upstream: dict[str, str], destination: Path,
                   stop_after: int | None) -> None:
    from conceptflow.methods.textual_localization.group_setup import GroupMember, prepare_group_training

    group, layout = catalog.group(group_name), Layout(catalog)
    config = group.train
    torch.manual_seed(catalog.seed)
    pipeline = load_base_pipeline(catalog.base_model_source, catalog.device,
                                  base_dtype_name(config.mixed_precision, catalog.dtype))
    first = group.concepts[0]
    image_paths = ingested_images(layout.images(first))
    names = [path.name for path in image_paths]
    members = []
    for member in group.concepts:
        if [path.name for path in ingested_images(layout.images(member))] != names:
            raise ConceptflowError(f"group {group_name}: the ingested photos of {member} and {first} differ; "
                                   f"run `conceptflow ingest --concept {member}` again")
        masks = layout.masks(member)
        members.append(GroupMember(member, catalog.concept(member).class_word, tuple(masks / name for name in names)))

    prior = None
    if config.prior_images > 0 and config.prior_weight > 0:
        fingerprint = model_fingerprint(catalog.base_model_source)
        per_class = []
        for member in members:
            key = class_images_key(fingerprint, member.class_word, catalog.resolution, config.prior_steps, catalog.seed)
            per_class.append(class_prior_images(pipeline, member.class_word, config.prior_images, catalog.resolution,
                                                config.prior_steps, catalog.seed, layout.class_images(key)))
        prior = prior_pixels(per_class, catalog.resolution)

    map_size = max(1, round(catalog.resolution * config.map_fraction))
    setup = prepare_group_training(pipeline, group_name, members, image_paths, ingested_captions(image_paths),
                                   catalog.resolution, map_size, catalog.seed, prior)
    method, history = train_method(catalog, setup, config, layout.checkpoints(group_name), run_key,
                                   f"group {group_name}", stop_after)
    tensors, method_meta = method.export()
    shared = {key: value for key, value in tensors.items() if not key.startswith(EMBEDDING_PREFIX)}
    with atomic_directory(destination) as staging:
        for member in members:
            tokens = set(setup.tokens_of(member.name))
            own = {key: value for key, value in tensors.items()
                   if key.startswith(EMBEDDING_PREFIX) and key.removeprefix(EMBEDDING_PREFIX) in tokens}
            meta = {"layer_tokens": setup.tokens_of(member.name), "n_layers": setup.n_layers, **method_meta}
            save_adapter(staging / member.name, {**own, **shared}, meta)
            if history:
                save_curve(history, staging / member.name / "loss.png", f"group {group_name} (textual_localization)")
        write_json_atomic(staging / HISTORY_FILE, history)
    shutil.rmtree(layout.checkpoints(group_name), ignore_errors=True)


def train_group_concept(catalog: Catalog, concept_name: str, force: bool = False, stop_after: int | None = None):
    concept = catalog.concept(concept_name)
    group_name = concept.group
    layout = Layout(catalog)
    upstream = upstream_md5s(catalog, "train", concept_name)  # images.<member>, masks.<member> of every member
    row = stage("train")
    settings_hash = row.config_hash(catalog, concept_name)
    config = concept.train
    runs = layout.group_runs(group_name)

    def produce(staging):
        run_key = group_run_key(catalog, group_name, upstream)
        result = runs / run_key
        with _locked(runs):
            if force or not (result / HISTORY_FILE).is_file():
                for stale in runs.iterdir():  # earlier runs of the group: superseded
                    if stale.is_dir() and stale.name != run_key and not stale.name.startswith("."):
                        shutil.rmtree(stale, ignore_errors=True)
                if force and result.exists():
                    shutil.rmtree(result)
                _train_jointly(catalog, group_name, run_key, upstream, result, stop_after)
        tensors, joint_meta = read_adapter(result / concept_name)
        history = json.loads((result / HISTORY_FILE).read_text(encoding="utf-8"))
        meta = {
            "kind": "concept", "name": concept_name, "method": config.method, "class_word": concept.class_word,
            "tokens": list(concept.tokens), "base_model": catalog.base_model,
            "base_model_hash": model_fingerprint(catalog.base_model_source), "resolution": catalog.resolution,
            "seed": catalog.seed, "config": config.model_dump(mode="json"), "config_hash": settings_hash,
            "data": upstream, **joint_meta,
        }
        save_adapter(staging, tensors, meta)
        if (result / concept_name / "loss.png").is_file():
            shutil.copyfile(result / concept_name / "loss.png", staging / "loss.png")
        return {"params": flat_params("", {"method": config.method, "base_model": catalog.base_model,
                                           "group": group_name, **config.model_dump(mode="json")}),
                "metrics": {k: v for k, v in (history[-1] if history else {}).items() if k != "step"},
                "history": history}

    return run_stage(row.name, concept_name, row.folder(catalog, concept_name), settings_hash, upstream, produce, force)
