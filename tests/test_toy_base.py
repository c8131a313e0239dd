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


def test_toy_base_draws_the_colours_held_out_prompts_ask_for(recogniser):
    """The committed base (6000 UNet steps) draws the asked colour (benchmark: 0.83) but not yet
    the shape (0.13, chance 0.125); a random base draws neither."""
    from conceptflow.toy.evaluators import attribute_recall

    prompts = [make_scene(950_000 + i, object_count=1).caption for i in range(12)]
    toy = attribute_recall(recogniser, _draw(str(TOY_BASE), prompts), prompts)["colour"]
    random_base = attribute_recall(recogniser, _draw("embedded:tiny-sd", prompts), prompts)["colour"]
    assert toy >= 0.5 and toy > random_base + 0.3


def test_toy_base_scaling_factor_whitens_its_latents():
    from conceptflow.models.loading import load_base_pipeline
    from conceptflow.toy.pretrain import to_pixels

    pipeline = load_base_pipeline(str(TOY_BASE))
    pixels = to_pixels([make_scene(960_000 + i).image for i in range(16)])
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        reconstruction = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
    assert 0.6 < float(latents.std()) < 1.5
    assert float((reconstruction - pixels).abs().mean()) < 0.08
