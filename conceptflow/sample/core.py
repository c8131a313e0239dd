"""The one sampling core: what every denoising loop of the project shares, around a loaded base.

``SamplingCore(pipeline)`` holds the UNet's attention controller (installed once) and the
cross-attention layer count, and gives the pieces every sampler, fusion's input capture and the
benchmarks use:

- ``encode(prompts, concepts)``: layer-wise text (batch, layers, tokens, dim);
- ``initial_latents(seeds, resolution)``: one seed per image, so that an image does not depend
  on which batch it was sampled in;
- ``denoise(latents, text, steps, uncond=..., guidance_scale=..., hooks=..., guide=...)``: the one
  DPM-Solver++ loop, with classifier-free guidance when ``uncond`` is given (one UNet call on
  ``[uncond, text]``) and without it otherwise (one call on ``text`` alone, as gradient fusion
  captures its inputs); ``hooks`` are active in every UNet call and ``guide(latents, timestep,
  step_index) -> latents`` runs before each, outside the steps' ``no_grad`` (so a guidance step
  may differentiate through a UNet pass of its own);
- ``predict_and_step``: one step of that loop (noise prediction, guidance, scheduler step);
- ``decode(latents)``: PIL images.

The loop is written out (not ``StableDiffusionPipeline.__call__``) because the text conditioning
is layer-wise and samplers plug in through the attention hooks and the per-step guide.

Half precision (a pipeline loaded with ``dtype: float16`` on CUDA, ``bfloat16`` on a CPU): the
UNet, text encoder and VAE run in the pipeline's dtype, while the latents stay float32 from the
initial noise to the decoder (``LATENT_DTYPE``): each UNet call gets a half-precision copy of
its input, its noise prediction is taken back to float32 for the scheduler step (DPM-Solver++'s
multistep update subtracts nearly equal terms), and the VAE gets a half-precision copy at the
end. A guide differentiates with respect to the float32 latents (the cast is part of its graph),
so its gradient is float32 too. In float32 every cast is the identity and nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from conceptflow.adapters.tokens import encode_layerwise
from conceptflow.attention.processor import AttentionHook, attention_controller_of

# guide(latents, timestep, step_index) -> latents, applied before each step's UNet call
Guide = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

# The denoising state's dtype, whatever the models': scheduler arithmetic in half precision drifts.
LATENT_DTYPE = torch.float32


@dataclass(frozen=True)
class SampleRequest:
    """One image to sample: its prompt (concepts written ``<name>``), its noise seed and, for the
    samplers that place concepts, its layout: ``boxes`` {concept: (x0, y0, x1, y1)} in relative
    coordinates (None: the sampler's default split) and ``layout_image`` (Concept Conductor's
    layout reference; None: one the base draws)."""

    prompt: str
    seed: int
    boxes: Mapping[str, tuple[float, float, float, float]] | None = None
    layout_image: Path | None = None


class SamplingCore:
    """A loaded base pipeline with its attention controller and layer count."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.controller = attention_controller_of(pipeline.unet)
        self.n_layers = self.controller.n_cross_layers

    @classmethod
    def of(cls, core_or_pipeline) -> "SamplingCore":
        """``core_or_pipeline`` itself if it is a core, else a core around the pipeline."""
        return core_or_pipeline if isinstance(core_or_pipeline, cls) else cls(core_or_pipeline)

    @property
    def unet(self):
        return self.pipeline.unet

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], concepts: Iterable[str] = ()) -> torch.Tensor:
        """Layer-wise text of ``prompts`` (batch, n_layers, tokens, dim); ``concepts`` are the
        loaded concepts their ``<name>`` references may use."""
        pipeline = self.pipeline
        return encode_layerwise(list(prompts), pipeline.tokenizer, pipeline.text_encoder, self.n_layers, concepts)

    def encode_uncond(self, batch: int) -> torch.Tensor:
        """The empty prompt's layer-wise text, ``batch`` times (classifier-free guidance)."""
        return self.encode([""] * batch)

    @property
    def model_dtype(self) -> torch.dtype:
        """The UNet's dtype (what its inputs are cast to)."""
        return self.pipeline.unet.dtype

    def initial_latents(self, seeds: Sequence[int], resolution: int) -> torch.Tensor:
        """Unit Gaussian latents (``LATENT_DTYPE``), image i drawn from its own generator seeded ``seeds[i]``."""
        pipeline = self.pipeline
        scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        shape = (pipeline.unet.config.in_channels, resolution // scale, resolution // scale)
        noises = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
        return torch.stack(noises).to(pipeline.unet.device, LATENT_DTYPE)

    def scheduler(self, steps: int, device):
        """A fresh DPM-Solver++ (the base's scheduler config) with ``steps`` timesteps set."""
        from diffusers import DPMSolverMultistepScheduler

        scheduler = DPMSolverMultistepScheduler.from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        return scheduler

    @torch.no_grad()
    def predict_and_step(self, scheduler, latents: torch.Tensor, timestep: torch.Tensor, conditioning: torch.Tensor,
                         guidance_scale: float | None = None) -> torch.Tensor:
        """One UNet noise prediction at ``timestep`` and the scheduler's step from ``latents``.

        With ``guidance_scale`` the UNet sees ``[latents, latents]`` against ``conditioning`` =
        ``[uncond, text]`` and the two predictions are combined (classifier-free guidance);
        without it, ``latents`` against ``conditioning`` = ``text``. The UNet runs in its own dtype;
        guidance and the scheduler step run in the latents' (float32).
        """
        guided = guidance_scale is not None
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, timestep)
        noise = self.unet(model_input.to(self.model_dtype), timestep, encoder_hidden_states=conditioning).sample
        noise = noise.to(latents.dtype)
        if guided:
            noise_uncond, noise_text = noise.chunk(2)
            noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        return scheduler.step(noise, timestep, latents).prev_sample

    def denoise(self, latents: torch.Tensor, text: torch.Tensor, steps: int, uncond: torch.Tensor | None = None,
                guidance_scale: float | Callable[[int], float] | None = None, hooks: Iterable[AttentionHook] = (),
                guide: Guide | None = None) -> torch.Tensor:
        """``steps`` DPM-Solver++ steps from unit-variance ``latents``; returns the final latents.

        Classifier-free guidance runs when ``uncond`` and ``guidance_scale`` are both given, none
        when both are None; ``guidance_scale`` may be a function of the step index (a per-step scale).
        """
        if (uncond is None) != (guidance_scale is None):
            raise ValueError("classifier-free guidance needs both uncond and guidance_scale (or neither)")
        scheduler = self.scheduler(steps, latents.device)
        latents = latents * scheduler.init_noise_sigma
        conditioning = text if uncond is None else torch.cat([uncond, text])
        with self.controller.use(*hooks):
            for step_index, timestep in enumerate(scheduler.timesteps):
                if guide is not None:
                    latents = guide(latents, timestep, step_index)
                scale = guidance_scale(step_index) if callable(guidance_scale) else guidance_scale
                latents = self.predict_and_step(scheduler, latents, timestep, conditioning, scale)
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """The VAE's images of ``latents``, as 8-bit RGB (the VAE runs in its own dtype)."""
        vae = self.pipeline.vae
        decoded = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        array = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(image)) for image in array]
