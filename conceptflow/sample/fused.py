"""The plain sampler of a (fused) concept model: batched prompts, classifier-free guidance,
one fixed seed per image, no hook and no guide (the sampling core's ``denoise`` as it is)."""

from __future__ import annotations

from typing import Sequence

from PIL import Image
from tqdm.auto import tqdm

from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.sample.registry import SamplingResult


def sample_images(core_or_pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str], resolution: int,
                  steps: int = 20, guidance_scale: float = 7.5, batch_size: int = 4,
                  description: str = "generate") -> list[Image.Image]:
    """Sample one image per request, ``batch_size`` at a time."""
    core = SamplingCore.of(core_or_pipeline)
    images = []
    for start in tqdm(range(0, len(requests), batch_size), desc=description, leave=False):
        chunk = requests[start : start + batch_size]
        text = core.encode([r.prompt for r in chunk], concepts)
        uncond = core.encode_uncond(len(chunk))
        latents = core.initial_latents([r.seed for r in chunk], resolution)
        latents = core.denoise(latents, text, steps, uncond=uncond, guidance_scale=guidance_scale)
        images.extend(core.decode(latents))
    return images


def sample(core_or_pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str], resolution: int, settings,
           description: str = "generate"):
    """The registry's entry point: ``settings`` gives steps, guidance_scale and batch_size."""
    images = sample_images(core_or_pipeline, requests, concepts, resolution, settings.steps, settings.guidance_scale,
                           settings.batch_size, description)
    return SamplingResult(images)
