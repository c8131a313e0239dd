"""The SD-1.5-shaped embedded base has SD 1.5's sizes (counted on the meta device: nothing allocated)."""

from __future__ import annotations

import pytest
import torch

from conceptflow.models.embedded import (
    EMBEDDED_BUILDERS,
    SD15_SCHEDULER_CONFIG,
    SD15_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
)

# runwayml/stable-diffusion-v1-5's parameter counts
SD15_UNET_PARAMS = 859_520_964
SD15_TEXT_PARAMS = 123_060_480
SD15_VAE_PARAMS = 83_653_863


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def meta_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
        vae = AutoencoderKL.from_config(SD15_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    assert next(unet.parameters()).is_meta
    return unet, vae, text


def test_unet_is_sd15s(meta_models):
    unet, _, _ = meta_models
    assert abs(_count(unet) - SD15_UNET_PARAMS) <= 0.01 * SD15_UNET_PARAMS
    assert _count(unet) == SD15_UNET_PARAMS  # the exact architecture, not just close
    cross = [name for name, module in unet.named_modules() if name.endswith("attn2")]
    assert len(cross) == 16
    assert {module.to_k.in_features for name, module in unet.named_modules() if name.endswith("attn2")} == {768}
    widths = sorted({module.to_q.in_features for name, module in unet.named_modules() if name.endswith("attn1")})
    assert widths == [320, 640, 1280]
    assert unet.config.sample_size == 64 and unet.config.in_channels == 4


def test_text_encoder_and_vae_are_sd15s(meta_models):
    _, vae, text = meta_models
    assert _count(text) == SD15_TEXT_PARAMS
    assert text.config.hidden_size == 768 and text.config.num_hidden_layers == 12
    assert text.config.vocab_size == 49408 and text.config.max_position_embeddings == 77
    assert _count(vae) == SD15_VAE_PARAMS
    assert vae.config.scaling_factor == 0.18215 and vae.config.latent_channels == 4
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # 512 px -> 64x64 latents


def test_scheduler_config_is_sd15s_and_the_builder_is_registered():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    for scheduler_class in (PNDMScheduler, DDIMScheduler, DPMSolverMultistepScheduler):
        scheduler = scheduler_class.from_config(SD15_SCHEDULER_CONFIG)
        assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
        assert abs(float(scheduler.alphas_cumprod[-1]) - 0.0047) < 1e-4  # SD 1.5's final alpha-bar
    assert "sd15-shaped" in EMBEDDED_BUILDERS
