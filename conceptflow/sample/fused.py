"""Plain sampling of a (fused) concept model: batched prompts, one fixed seed per image.

The loop is written out (not ``StableDiffusionPipeline.__call__``) because the text
conditioning is layer-wise (batch, layers, tokens, dim) and samplers plug in through the
attention hooks and the per-step ``guide`` callback. Each image's initial noise comes from
its own seed, so an image does not depend on which batch it was sampled in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from conceptflow.adapters.tokens import encode_layerwise
from conceptflow.attention.processor import AttentionHook, install_attention_controller

# guide(latents, timestep, step_index) -> latents, applied before each UNet call
Guide = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    seed: int


def initial_latents(pipeline, seeds: Sequence[int], resolution: int) -> torch.Tensor:
    scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    shape = (pipeline.unet.config.in_channels, resolution // scale, resolution // scale)
    noises = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(noises).to(pipeline.unet.device, pipeline.unet.dtype)


@torch.no_grad()
def decode_images(pipeline, latents: torch.Tensor) -> list[Image.Image]:
    decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
    array = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in array]


def denoise(pipeline, text: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor, steps: int,
            guidance_scale: float, hooks: Iterable[AttentionHook] = (), guide: Guide | None = None) -> torch.Tensor:
    """DPM-Solver++ with classifier-free guidance; ``hooks`` are active in every UNet call."""
    from diffusers import DPMSolverMultistepScheduler

    controller = install_attention_controller(pipeline.unet)
    scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    conditioning = torch.cat([uncond, text])
    with controller.use(*hooks):
        for step_index, timestep in enumerate(scheduler.timesteps):
            if guide is not None:
                latents = guide(latents, timestep, step_index)
            with torch.no_grad():
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
                noise = pipeline.unet(model_input, timestep, encoder_hidden_states=conditioning).sample
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = scheduler.step(noise, timestep, latents).prev_sample
    return latents


def sample_images(pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str], resolution: int,
                  steps: int = 20, guidance_scale: float = 7.5, batch_size: int = 4,
                  description: str = "generate") -> list[Image.Image]:
    """Sample one image per request, ``batch_size`` at a time."""
    controller = install_attention_controller(pipeline.unet)
    n_layers = len(controller.cross_layers)
    images = []
    for start in tqdm(range(0, len(requests), batch_size), desc=description, leave=False):
        chunk = requests[start : start + batch_size]
        with torch.no_grad():
            text = encode_layerwise([r.prompt for r in chunk], pipeline.tokenizer, pipeline.text_encoder, n_layers, concepts)
            uncond = encode_layerwise([""] * len(chunk), pipeline.tokenizer, pipeline.text_encoder, n_layers)
        latents = initial_latents(pipeline, [r.seed for r in chunk], resolution)
        latents = denoise(pipeline, text, uncond, latents, steps, guidance_scale)
        images.extend(decode_images(pipeline, latents))
    return images
