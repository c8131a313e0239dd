"""Every registered training method through the real stages: train -> save -> load -> merge -> fuse.

Table-driven over ``conceptflow.methods.METHODS``: a method added to the registry is covered
here without a new test body. Each row trains two tiny concepts with the method on the tiny
base (a few steps), reads them back through the method's reader, merges them into a fresh
pipeline and fuses them by gradient fusion.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conceptflow.adapters.concept_io import get_linear, read_adapter
from conceptflow.adapters.merge import apply_concepts, base_weights
from conceptflow.config import load_catalog
from conceptflow.errors import ConceptflowError
from conceptflow.layout import Layout
from conceptflow.methods import METHODS, read_concept
from conceptflow.models.loading import load_base_pipeline

STEPS = 2


def write_photos(folder, colour, offset):
    folder.mkdir(parents=True)
    for index in range(3):
        array = np.full((64, 64, 3), 235, np.uint8)
        array[14:50, 10 + offset + 3 * index: 40 + offset + 3 * index] = colour
        Image.fromarray(array).save(folder / f"{index}.png")


def method_catalog(tmp_path, method: str):
    write_photos(tmp_path / "photos" / "red", (220, 40, 40), 0)
    write_photos(tmp_path / "photos" / "blue", (40, 60, 220), 6)
    train = {"method": method, "steps": STEPS, "batch_size": 1, "checkpoint_every": 1}
    raw = {
        "base_model": "embedded:tiny-sd", "resolution": 64, "seed": 0,
        "concepts": {"redbox": {"class_word": "box", "images": "photos/red", "train": train},
                     "bluebox": {"class_word": "cup", "images": "photos/blue", "train": train}},
        "combinations": {"redbox+bluebox": {"concepts": ["redbox", "bluebox"],
                                            "prompts": ["a <redbox> and a <bluebox>"], "seeds": [0]}},
        "mask": {"backend": "saliency"}, "fuse": {"method": "gradient"},
    }
    if METHODS[method].trains_groups:  # learnt together from photos showing both (the group form)
        write_photos(tmp_path / "photos" / "both", (40, 160, 60), 3)
        raw["groups"] = {"boxes": {"images": "photos/both", "concepts": ["redbox", "bluebox"],
                                   "train": {**train, "prior_images": 1, "prior_steps": 1}}}
        for concept in raw["concepts"].values():
            del concept["images"], concept["train"]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_catalog(path)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_saves_loads_merges_and_fuses(method, tmp_path, tiny_sd_path, one_torch_thread):
    from conceptflow.stages.fuse import fuse
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.stages.train import train

    catalog = method_catalog(tmp_path, method)
    layout = Layout(catalog)
    for concept in ("redbox", "bluebox"):
        ingest(catalog, concept)
        mask(catalog, concept)
    for concept in ("redbox", "bluebox"):  # a group's concept trains on every member's masks
        manifest, ran = train(catalog, concept)
        assert ran and manifest.md5

    # save: safetensors + concept.json naming the method, the concept's tokens among the tensors
    tensors, meta = read_adapter(layout.adapter("redbox"))
    assert meta["method"] == method and meta["name"] == "redbox"
    assert all(tensor.dtype == torch.float32 for tensor in tensors.values())
    assert {key for key in tensors if key.startswith("embedding.")} == {f"embedding.{t}" for t in meta["layer_tokens"]}

    # load: the method's reader names only real linears, with their weights' shapes
    pipeline = load_base_pipeline("embedded:tiny-sd")
    effects = [read_concept(layout.adapter(name), pipeline) for name in ("redbox", "bluebox")]
    base = base_weights(pipeline, sorted(set().union(*(e.adapted_paths for e in effects))))
    for concept in effects:
        assert set(concept.embeddings) == {t for t in read_adapter(layout.adapter(concept.name))[1]["layer_tokens"]}
        for path, delta in concept.deltas.items():
            assert delta.shape == base[path].shape and torch.isfinite(delta).all()

    # merge: the tokens land in the text encoder, the updates in the weights; run-time channels
    # (ToVA's token deltas) cannot be merged: merge refuses them, and merges the rest
    if not all(e.mergeable for e in effects):
        with pytest.raises(ConceptflowError, match="act at run time"):
            apply_concepts(pipeline, effects, scale=1.0)
    apply_concepts(pipeline, [dataclasses.replace(e, token_deltas={}, text_residuals=[]) for e in effects], scale=1.0)
    table = pipeline.text_encoder.get_input_embeddings().weight
    for concept in effects:
        for token, row in concept.embeddings.items():
            torch.testing.assert_close(table[pipeline.tokenizer.convert_tokens_to_ids(token)], row)
    for path in base:
        expected = base[path].float() + sum(e.deltas[path] for e in effects if path in e.deltas)
        torch.testing.assert_close(get_linear(pipeline, path).weight.float(), expected, rtol=0, atol=1e-6)

    # fuse: one fused model holding every adapted layer and both concepts' tokens
    manifest, ran = fuse(catalog, "redbox+bluebox")
    assert ran
    fused_tensors, fused_meta = read_adapter(layout.fused("redbox+bluebox"))
    assert fused_meta["kind"] == "fused" and set(fused_meta["concepts"]) == {"redbox", "bluebox"}
    assert {k.removeprefix("weight.") for k in fused_tensors if k.startswith("weight.")} == {
        path for e in effects for path in e.deltas}
    fused = read_concept(layout.fused("redbox+bluebox"), load_base_pipeline("embedded:tiny-sd"))
    assert set(fused.embeddings) == set(effects[0].embeddings) | set(effects[1].embeddings)
    # run-time channels are carried to run time unfused, each concept's at its own tokens
    carried = {(part.name, path): td for part in fused.parts for path, td in part.token_deltas.items()}
    assert carried.keys() == {(e.name, path) for e in effects for path in e.token_deltas}
    for e in effects:
        for path, token_delta in e.token_deltas.items():
            assert carried[(e.name, path)].tokens == token_delta.tokens
            torch.testing.assert_close(carried[(e.name, path)].delta, catalog.fuse.adapter_scale * token_delta.delta)
