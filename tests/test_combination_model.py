"""What a combination is sampled from: the fused model (with its concepts' run-time parts) or,
for a ``uses_adapters`` sampler, the bare base and each concept's own adapter."""

import dataclasses

import numpy as np
import pytest
import torch
import yaml

from conceptflow.adapters.branched import runtime_concepts
from conceptflow.adapters.concept_io import save_adapter
from conceptflow.adapters.effects import ConceptEffects, TextResidual, TokenDelta
from conceptflow.adapters.merge import apply_concepts, fused_runtime_tensors
from conceptflow.attention.processor import attention_controller_of
from conceptflow.errors import ConceptflowError
from conceptflow.methods import read_concept
from conceptflow.sample import SAMPLERS
from conceptflow.sample.core import SamplingCore
from conceptflow.sample.registry import SamplerSpec, SamplingResult

PAIR = ("zigzag_star", "quartered_heart")


def runtime_concept(pipeline, name: str, seed: int) -> ConceptEffects:
    """A concept with only run-time channels: a value update at the word "dog" in one
    cross-attention layer and a residual at "cat"."""
    generator = torch.Generator().manual_seed(seed)
    layer = attention_controller_of(pipeline.unet).cross_layers[0].name
    to_v = pipeline.unet.get_submodule(f"{layer}.to_v")
    hidden = pipeline.text_encoder.config.hidden_size
    return ConceptEffects({"name": name, "method": "test"},
                          token_deltas={f"unet.{layer}.to_v": TokenDelta(torch.randn(to_v.weight.shape, generator=generator),
                                                                        ("dog",))},
                          text_residuals=[TextResidual("cat", torch.randn(hidden, generator=generator))])


def noise_prediction(pipeline, prompt: str) -> torch.Tensor:
    core = SamplingCore(pipeline)
    text = core.encode([prompt])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipeline.unet(latents, torch.tensor(500), encoder_hidden_states=text).sample


def test_fused_model_carries_run_time_parts_scaled_and_they_act_as_the_concepts(tiny_pipeline, tmp_path):
    concepts = [runtime_concept(tiny_pipeline, name, seed) for name, seed in (("a", 1), ("b", 2))]
    mergeable = ConceptEffects({"name": "plain", "method": "edlora"})
    tensors, parts = fused_runtime_tensors([concepts[0], mergeable, concepts[1]], scale=0.5)
    assert [part["name"] for part in parts] == ["a", "b"]  # the mergeable concept has no part
    folder = save_adapter(tmp_path / "fused", tensors, {"kind": "fused", "name": "a+b", "runtime_parts": parts})
    fused = read_concept(folder, tiny_pipeline)
    assert not fused.mergeable and [part.name for part in fused.parts] == ["a", "b"]
    for part, concept in zip(fused.parts, concepts):
        (path, stored), = part.token_deltas.items()
        assert stored.tokens == ("dog",) and torch.equal(stored.delta, 0.5 * concept.token_deltas[path].delta)
        assert torch.equal(part.text_residuals[0].vector, concept.text_residuals[0].vector)
    # Two concepts' token deltas at the same linear stay apart (one part each) and apply together.
    prompt = "a dog and a cat"
    with runtime_concepts(tiny_pipeline, [fused]):
        from_fused = noise_prediction(tiny_pipeline, prompt)
    halved = [dataclasses.replace(c, token_deltas={p: TokenDelta(0.5 * d.delta, d.tokens) for p, d in c.token_deltas.items()})
              for c in concepts]
    with runtime_concepts(tiny_pipeline, halved):
        from_concepts = noise_prediction(tiny_pipeline, prompt)
    base = noise_prediction(tiny_pipeline, prompt)
    assert torch.allclose(from_fused, from_concepts, atol=1e-6)
    assert not torch.allclose(from_fused, base, atol=1e-4)
    with pytest.raises(ConceptflowError, match="act at run time"):
        apply_concepts(tiny_pipeline, [fused])


# --- the generate stage with a sampler that takes separate adapters ---------------------------

SEEN: dict = {}


def spy_sample(core, requests, concepts, resolution, settings, description, adapters=None):
    """A uses_adapters sampler: records what it was given, returns grey images and one mask each."""
    base = core.pipeline.unet.get_parameter(SEEN["probe"]).detach().clone()
    SEEN.update(adapters=adapters, probe_weight=base, concepts=list(concepts))
    from PIL import Image

    images = [Image.new("RGB", (resolution, resolution), (128, 128, 128)) for _ in requests]
    masks = [{name: np.eye(8, dtype=np.float32) for name in concepts} for _ in requests]
    return SamplingResult(images, masks=masks)


@pytest.fixture(scope="module")
def fused_project(tmp_path_factory, one_torch_thread):
    from conceptflow.config import load_catalog
    from conceptflow.stages.fuse import fuse
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.stages.train import train
    from conceptflow.toy.concepts import write_toy_catalog

    root = tmp_path_factory.mktemp("combination")
    path = write_toy_catalog(root, list(PAIR), images_per_concept=2, train_steps=2, prompt_seeds=(0,))
    raw = yaml.safe_load(path.read_text())
    raw["fuse"] = {"method": "average"}
    raw["generate"] = {"sampler": "fused", "steps": 2, "batch_size": 2}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    catalog = load_catalog(path)
    for name in PAIR:
        ingest(catalog, name)
        mask(catalog, name)
        train(catalog, name)
    combination = catalog.combinations[0].name
    fuse(catalog, combination)
    return catalog, combination


def test_adapter_sampler_gets_the_bare_base_and_each_concepts_adapter(fused_project, monkeypatch, tmp_path):
    from conceptflow.layout import Layout
    from conceptflow.models.loading import load_base_pipeline
    from conceptflow.report import write_report
    from conceptflow.stages.generate import generate

    catalog, combination = fused_project
    layout = Layout(catalog)
    fused = read_concept(layout.fused(combination), load_base_pipeline(catalog.base_model_source))
    probe = next(path for path in fused.weights if path.startswith("unet.")).removeprefix("unet.") + ".weight"
    SEEN.clear()
    SEEN["probe"] = probe
    monkeypatch.setitem(SAMPLERS, "fused", SamplerSpec("fused", None, 20, f"{__name__}:spy_sample", uses_adapters=True))
    generate(catalog, combination, force=True)

    base = load_base_pipeline(catalog.base_model_source)
    assert torch.equal(SEEN["probe_weight"], base.unet.get_parameter(probe))  # not the fused weights
    assert not torch.equal(SEEN["probe_weight"], fused.weights["unet." + probe.removesuffix(".weight")])
    assert sorted(SEEN["adapters"]) == sorted(PAIR)
    for name, effects in SEEN["adapters"].items():
        own = read_concept(layout.adapter(name), base)
        assert effects.deltas.keys() == own.deltas.keys()
        assert all(torch.equal(effects.deltas[p], own.deltas[p]) for p in own.deltas)

    listing = yaml.safe_load((layout.generated(combination) / "images.json").read_text())
    row = listing["images"][0]
    assert set(row["masks"]) == set(PAIR) and (layout.generated(combination) / row["masks"][PAIR[0]]).is_file()
    from PIL import Image

    plain = np.asarray(Image.open(layout.generated(combination) / row["plain_file"])).astype(int)
    report = write_report(catalog, tmp_path / "index.html").read_text()
    assert report.count("class=\"sampler-mask\"") == 2 * len(listing["images"])  # each concept's mask, each image
    monkeypatch.undo()
    generate(catalog, combination, force=True)  # the fused sampler itself: the plain image beside was its image
    fused_image = np.asarray(Image.open(layout.generated(combination) / "000.png")).astype(int)
    assert np.abs(plain - fused_image).mean() < 1.0  # run-time (ΔW hooks) vs merged weights: rounding only


def test_adapter_sampler_refuses_an_adapter_retrained_after_fusion(fused_project):
    from conceptflow.layout import Layout
    from conceptflow.stages.combination_model import fused_sources
    from conceptflow.stages.base import read_manifest

    catalog, combination = fused_project
    meta = yaml.safe_load((Layout(catalog).fused(combination) / "concept.json").read_text())
    assert set(fused_sources(catalog, combination, meta)) == set(PAIR)
    meta["concepts"][PAIR[0]]["md5"] = "0" * 32
    with pytest.raises(ConceptflowError, match="conceptflow fuse --combination"):
        fused_sources(catalog, combination, meta)
    assert read_manifest(Layout(catalog).adapter(PAIR[0])) is not None


def test_evaluate_scores_the_attention_entropy_change_per_concept(fused_project):
    import json

    from conceptflow.layout import Layout
    from conceptflow.stages.evaluate import evaluate
    from conceptflow.stages.generate import generate

    catalog, combination = fused_project
    generate(catalog, combination)
    evaluate(catalog, combination, force=True)
    scores = json.loads((Layout(catalog).metrics(combination) / "metrics.json").read_text())
    per_concept = [scores["per_concept"][name]["attention_entropy_change"] for name in PAIR]
    assert all(np.isfinite(value) and value != 0 for value in per_concept)
    assert scores["overall"]["attention_entropy_change"] == pytest.approx(np.mean(per_concept))  # one image per prompt
    one_step = catalog.model_copy(update={"generate": catalog.generate.model_copy(update={"steps": 1})})
    evaluate(one_step, combination, force=True)  # no change between steps to measure: None, not an error
    scores = json.loads((Layout(catalog).metrics(combination) / "metrics.json").read_text())
    assert scores["overall"]["attention_entropy_change"] is None
    off = catalog.model_copy(update={"evaluate": catalog.evaluate.model_copy(update={"attention_entropy": False})})
    evaluate(off, combination, force=True)
    scores = json.loads((Layout(catalog).metrics(combination) / "metrics.json").read_text())
    assert "attention_entropy_change" not in scores["overall"]


@pytest.mark.parametrize("sampler", [name for name in SAMPLERS if name != "fused"])
def test_every_sampler_runs_through_the_generate_stage(fused_project, sampler):
    """A one-line change (``generate --sampler``): images, the plain fused images beside, the
    concepts' attention maps (and the masks of a sampler that has them) on disk and in the report."""
    import json

    from conceptflow.layout import Layout
    from conceptflow.report import write_report
    from conceptflow.stages.generate import generate

    catalog, combination = fused_project
    settings = {"sampler": sampler, "steps": 4, "batch_size": 2}
    catalog = catalog.model_copy(update={"generate": type(catalog.generate).model_validate(settings)})
    generate(catalog, combination, sampler=sampler, force=True)
    folder = Layout(catalog).generated(combination)
    listing = json.loads((folder / "images.json").read_text())
    combination_entry = catalog.combination(combination)
    assert listing["sampler"] == sampler
    assert len(listing["images"]) == len(combination_entry.prompts) * len(combination_entry.seeds)
    row = listing["images"][0]
    assert (folder / row["file"]).is_file() and (folder / row["plain_file"]).is_file()
    assert set(row.get("attention", {})) | set(row.get("masks", {})) == set(PAIR)
    report = write_report(catalog, folder.parent / f"report-{sampler}.html").read_text()
    assert f"Generated ({sampler})" in report
    cache = catalog.root / ".cache" / "samplers" / sampler  # what a sampler reuses across runs (Conductor's inversions)
    assert sorted(p.suffix for p in cache.glob("*")) == ([".safetensors"] * len(listing["images"])
                                                          if SAMPLERS[sampler].uses_cache else [])
