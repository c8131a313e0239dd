"""The committed toy base draws what held-out prompts ask for, judged by the toy recogniser:
assertions a random base (such as embedded:tiny-sd) cannot pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conceptflow.toy.world import make_scene

TOY_BASE = Path(__file__).resolve().parents[1] / "assets" / "toy-base"
pytestmark = pytest.mark.skipif(not (TOY_BASE / "model_index.json").is_file()
                                or not (TOY_BASE / "evaluators" / "recogniser").is_dir(),
                                reason="toy base weights not committed")
pytestmark = [pytestmark, pytest.mark.usefixtures("one_torch_thread")]
IDENTITY_TRAIN_STEPS = 60


@pytest.fixture(scope="module")
def recogniser():
    from conceptflow.toy.evaluators import ToyRecogniser

    return ToyRecogniser(TOY_BASE / "evaluators" / "recogniser")


def _draw(model_id: str, prompts: list[str]):
    from conceptflow.models.loading import load_base_pipeline

    pipeline = load_base_pipeline(model_id)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipeline(prompts, num_inference_steps=15, guidance_scale=7.5, generator=generators,
                    output_type="pil").images


def test_toy_base_draws_the_shapes_and_colours_held_out_prompts_ask_for(recogniser):
    """Held-out single-object prompts: the committed base draws the asked shape in the asked
    colour (benchmark: see assets/toy-base/README.md); a random base (embedded:tiny-sd) does not."""
    from conceptflow.toy.evaluators import prompt_alignment

    prompts = [make_scene(950_000 + i, object_count=1).caption for i in range(12)]
    toy = prompt_alignment(recogniser, _draw(str(TOY_BASE), prompts), prompts)
    random_base = prompt_alignment(recogniser, _draw("embedded:tiny-sd", prompts), prompts)
    assert toy >= 0.75 and random_base <= 0.2, (toy, random_base)


def test_toy_base_scaling_factor_whitens_its_latents():
    from conceptflow.models.loading import load_base_pipeline
    from recipes.toy.pretrain import to_pixels

    pipeline = load_base_pipeline(str(TOY_BASE))
    pixels = to_pixels([make_scene(960_000 + i).image for i in range(16)])
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        reconstruction = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
    assert 0.6 < float(latents.std()) < 1.5
    assert float((reconstruction - pixels).abs().mean()) < 0.08


def test_fine_tuning_a_toy_concept_raises_its_identity_above_the_base_class_word(tmp_path):
    """ED-LoRA on the toy base: after a short fine-tune the concept's images are closer (toy
    DINO) to its reference views than what the base draws for its class word, "a star"."""
    import yaml

    from conceptflow.config import load_catalog
    from conceptflow.stages.chain import make_combination
    from conceptflow.stages.generate import generated_images
    from conceptflow.toy.concepts import TOY_CONCEPTS, render_concept_images, write_toy_catalog
    from conceptflow.toy.evaluators import ToyIdentityEncoder, identity_similarity

    name = "zigzag_star"
    path = write_toy_catalog(tmp_path, [name], base_model=str(TOY_BASE), train_steps=IDENTITY_TRAIN_STEPS,
                             combinations={name: (name,)}, prompt_seeds=range(3))
    spec = yaml.safe_load(path.read_text())
    spec["combinations"][name]["prompts"] = [f"a <{name}>"]
    spec["generate"] = {"sampler": "fused", "steps": 15}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    tuned = [image for image, _ in generated_images(make_combination(load_catalog(path), name))]
    base = _draw(str(TOY_BASE), ["a star"] * len(tuned))
    identity = ToyIdentityEncoder(TOY_BASE / "evaluators" / "identity")
    references = [view.image for view in render_concept_images(TOY_CONCEPTS[name], 5)]
    tuned_score = identity_similarity(identity, tuned, references)
    base_score = identity_similarity(identity, base, references)
    assert tuned_score > base_score + 0.3, (tuned_score, base_score)  # measured: 0.65 vs 0.03
