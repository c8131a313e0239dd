"""Toy-base pretraining at smoke scale: losses that learn, a loadable diffusers folder, resume."""

from __future__ import annotations

import json

import pytest
import torch

from conceptflow.models.loading import load_base_pipeline
from recipes.toy.pretrain import (
    PretrainConfig,
    add_measurements_to_card,
    build_toy_pipeline,
    denoising_loss,
    pretrain_toy_base,
    scene_batch,
    vae_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMOKE = PretrainConfig(vae_steps=3, vae_foreground_start=1, vae_batch_size=2, latent_scenes=8, unet_steps=3, batch_size=2,
                       warmup_steps=1, checkpoint_every=2)


@pytest.fixture(scope="module")
def toy_pipeline(tmp_path_factory):
    return build_toy_pipeline(tmp_path_factory.mktemp("toy"))


def test_batches_are_a_function_of_seed_stage_and_step():
    first_pixels, first_captions = scene_batch(SMOKE, 1, 5, 3)
    again_pixels, again_captions = scene_batch(SMOKE, 1, 5, 3)
    other_pixels, _ = scene_batch(SMOKE, 1, 6, 3)
    assert torch.equal(first_pixels, again_pixels) and first_captions == again_captions
    assert not torch.equal(first_pixels, other_pixels)
    assert first_pixels.shape == (3, 3, 64, 64) and -1 <= first_pixels.min() and first_pixels.max() <= 1


def test_unnamed_instances_are_captioned_by_their_shape_alone():
    import numpy as np

    from conceptflow.toy.world import caption
    from recipes.toy.pretrain import pretraining_scene

    config = PretrainConfig(unnamed_instance_probability=0.5, caption_drop_probability=0.0)
    rng = np.random.default_rng(3)
    objects = [obj for _ in range(60) for obj in pretraining_scene(config, rng).objects]
    unnamed = [obj for obj in objects if obj.colour is None]
    assert 0.3 < len(unnamed) / len(objects) < 0.7
    assert all(len(set(obj.look.colours)) >= 2 and obj.size and obj.position for obj in unnamed)
    for _ in range(20):
        scene = pretraining_scene(config, rng)
        text = caption(scene)
        for obj in scene.objects:
            # "a big star on the left": shape, size and place, and no colour word for an unnamed one
            expected = f"{obj.size} {obj.shape}" if obj.colour is None else f"{obj.size} {obj.colour}"
            assert expected in text
    plain = PretrainConfig(unnamed_instance_probability=0.0)
    assert all(obj.colour for _ in range(20) for obj in pretraining_scene(plain, rng).objects)


def _fit(parameters, loss_fn, steps: int, lr: float) -> tuple[float, float]:
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_vae_loss_decreases_on_a_fixed_batch(toy_pipeline):
    torch.manual_seed(0)
    pixels, _ = scene_batch(SMOKE, 1, 0, 2)
    first, last = _fit(toy_pipeline.vae.parameters(),
                       lambda: vae_loss(toy_pipeline.vae, pixels, 1e-6, torch.Generator().manual_seed(0)),
                       steps=12, lr=2e-3)
    assert last < 0.7 * first


def test_denoising_loss_decreases_on_a_fixed_batch(toy_pipeline):
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    captions = ["a red star on the left", "a blue circle"]
    scheduler = DDPMScheduler.from_config(toy_pipeline.scheduler.config)
    parameters = [*toy_pipeline.unet.parameters(), *toy_pipeline.text_encoder.parameters()]
    first, last = _fit(parameters, lambda: denoising_loss(
        toy_pipeline.unet, toy_pipeline.text_encoder, toy_pipeline.tokenizer, scheduler, latents, captions,
        torch.Generator().manual_seed(2), min_snr_gamma=5.0), steps=12, lr=2e-3)
    assert last < 0.7 * first


def test_text_encoder_gets_gradients_from_the_denoising_loss(toy_pipeline):
    from diffusers import DDPMScheduler

    toy_pipeline.text_encoder.zero_grad()
    scheduler = DDPMScheduler.from_config(toy_pipeline.scheduler.config)
    loss = denoising_loss(toy_pipeline.unet, toy_pipeline.text_encoder, toy_pipeline.tokenizer, scheduler,
                          torch.randn(1, 4, 16, 16), ["a red star"], torch.Generator().manual_seed(0))
    loss.backward()
    star = toy_pipeline.tokenizer("star", add_special_tokens=False).input_ids[0]
    embedding_grad = toy_pipeline.text_encoder.get_input_embeddings().weight.grad
    assert embedding_grad[star].abs().sum() > 0
    assert embedding_grad[toy_pipeline.tokenizer("dog", add_special_tokens=False).input_ids[0]].abs().sum() == 0


def test_pretrain_saves_a_loadable_pipeline_with_a_card_and_resumes(tmp_path):
    result = pretrain_toy_base(tmp_path / "toy", minutes=None, config=SMOKE, progress=False)
    assert result.complete and result.unet_steps_done == 3
    pipeline = load_base_pipeline(str(tmp_path / "toy"))
    assert pipeline.unet.config.attention_head_dim == 2
    assert pipeline.vae.config.scaling_factor != pytest.approx(0.18215)  # measured, not SD's
    image = pipeline("a red star", num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)
    card = (tmp_path / "toy" / "README.md").read_text()
    assert "complete" in card and "MB of safetensors" in card

    longer = PretrainConfig(**{**SMOKE.__dict__, "unet_steps": 5})
    resumed = pretrain_toy_base(tmp_path / "toy", minutes=None, config=longer, progress=False)
    assert resumed.vae_steps_done == 3 and resumed.unet_steps_done == 5
    sessions = json.loads((tmp_path / "toy" / "pretrain_sessions.json").read_text())
    assert [s["unet_steps_done"] for s in sessions] == [3, 5]

    add_measurements_to_card(tmp_path / "toy", {"single_object_accuracy": 0.5})
    add_measurements_to_card(tmp_path / "toy", {"single_object_accuracy": 0.9})
    card = (tmp_path / "toy" / "README.md").read_text()
    assert card.count("## Measured") == 1 and "single_object_accuracy: 0.9" in card and "## How it was made" in card


def test_object_weights_of_one_leave_the_denoising_loss_unchanged(toy_pipeline):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(toy_pipeline.scheduler.config)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def loss(weights):
        with torch.no_grad():
            return denoising_loss(toy_pipeline.unet, toy_pipeline.text_encoder, toy_pipeline.tokenizer, scheduler,
                                  latents, ["a red star", "a blue circle"], torch.Generator().manual_seed(2),
                                  latent_weights=weights)

    plain = loss(None)
    assert torch.allclose(loss(torch.ones(2, 1, 16, 16)), plain)
    assert torch.allclose(loss(torch.full((2, 1, 16, 16), 3.0)), plain)  # weights are renormalised per image
    focused = torch.ones(2, 1, 16, 16)
    focused[:, :, 4:8, 4:8] = 5.0
    assert not torch.allclose(loss(focused), plain)


def test_saved_weights_are_the_moving_average_and_resume_keeps_it(tmp_path):
    from safetensors.torch import load_file

    config = PretrainConfig(**{**SMOKE.__dict__, "ema_decay": 0.5})
    pretrain_toy_base(tmp_path / "toy", minutes=None, config=config, progress=False)
    state = torch.load(tmp_path / "toy" / "checkpoints" / "denoiser.pt", weights_only=True)
    saved = load_file(str(tmp_path / "toy" / "unet" / "diffusion_pytorch_model.safetensors"))
    shadow = state["ema"]["shadow_params"]
    raw = list(state["unet"].values())
    names = list(state["unet"])
    assert state["ema"]["optimization_step"] == 3
    assert all(saved[name].dtype == torch.float16 for name in names)  # stored in half precision
    assert all(torch.equal(saved[name], average.half()) for name, average in zip(names, shadow))
    assert any(not torch.equal(saved[name], value.half()) for name, value in zip(names, raw))

    longer = PretrainConfig(**{**config.__dict__, "unet_steps": 5})
    pretrain_toy_base(tmp_path / "toy", minutes=None, config=longer, progress=False)
    state = torch.load(tmp_path / "toy" / "checkpoints" / "denoiser.pt", weights_only=True)
    assert state["ema"]["optimization_step"] == 5
