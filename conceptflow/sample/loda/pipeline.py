"""The LODA sampler: the sampling core's ``denoise`` with a per-step latent optimisation (``guide``).

Before the UNet call of each of the first ``steps`` denoising steps, ``LodaGuide`` takes
``inner_steps`` gradient steps on the latents (Algorithm 1, lines 6-14): a UNet pass on the
text-conditioned latents alone (no classifier-free guidance, as the reference), stopped right
after the last cross-attention layer the loss reads, gives each named concept's map; the loss
ReLU(γ − KL^H) (``loss.py``) is summed over the batch's images (which stay independent) and the
latents move by η_i·∇. The model is whatever the pipeline holds (a fused model, or concepts
applied at run time or per branch around the call): LODA only reads attention maps, through
the project's attention hooks.

Besides the images the sampler records each concept's attention map in the denoising UNet
calls (mean over steps, all cross-attention layers, heads and the concept's two tokens, at
latent resolution, min-max normalised; as ConceptFlow-M) and its registry entry point samples
the plain fused images of the same requests for comparison. With LODA off and no maps asked
for, no hook and no guide is installed and the images are ``fused.sample_images``' bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from conceptflow.attention.processor import CrossAttentionMapRecorder, StopForward
from conceptflow.sample.conceptflow_m.layout_guidance import TruncatingMapRecorder
from conceptflow.sample.conceptflow_m.pipeline import concept_token_positions, named_concepts
from conceptflow.sample.conceptflow_m.sama import mean_concept_maps, normalize_maps
from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.sample.fused import sample_images
from conceptflow.sample.loda.config import LodaConfig
from conceptflow.sample.loda.loss import loda_losses, map_layer_names, step_sizes
from conceptflow.sample.registry import SamplingResult


class LodaGuide:
    """Algorithm 1's lines 6-14 for a batch: ``__call__(latents, timestep, step_index) -> latents``.

    ``text`` (B, layers, tokens, dim) is the batch's layer-wise text (no unconditional rows),
    ``token_positions`` (B, 2K) each named concept's two tokens, ``valid`` (B, K) which concepts
    each prompt names; ``total_steps`` sets the step-size schedule's length.
    """

    def __init__(self, core: SamplingCore, text: torch.Tensor, token_positions: torch.Tensor, valid: torch.Tensor,
                 config: LodaConfig, total_steps: int, latent_side: int):
        self.core = core
        self.text = text
        self.token_positions = token_positions
        self.valid = valid
        self.config = config
        self.layer_names, self.map_side = map_layer_names(
            core.controller.layers, latent_side, len(core.unet.config.block_out_channels), config.map_resolution)
        start, end = config.step_size_range
        self.step_sizes = step_sizes(total_steps, config.step_size, start, end)
        self.has_pairs = bool((valid.sum(dim=1) >= 2).any())
        self.trace: list[tuple[int, int, list[float]]] = []  # (step, inner step, per-image loss)

    def concept_maps(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Raw concept maps (B, K, side, side) at ``latents``, with graph: a truncated UNet pass.

        DPM-Solver's ``scale_model_input`` is the identity, so the latents go in as they are
        (cast to the UNet's dtype inside the graph). The loss runs in float64: KL between nearly equal
        maps of many cells is a sum of small differences of logs, which float32 rounds away.
        """
        recorder = TruncatingMapRecorder(self.token_positions, self.layer_names)
        with self.core.controller.use(recorder):
            try:
                self.core.unet(latents.to(self.core.model_dtype), timestep, encoder_hidden_states=self.text)
            except StopForward:
                pass
        return mean_concept_maps([recorder.maps[name].double() for name in self.layer_names], self.valid.shape[1],
                                 self.map_side)

    def losses(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """ReLU(γ − KL^H) per image (B,), with graph."""
        c = self.config
        return loda_losses(self.concept_maps(latents, timestep), self.valid, c.threshold, c.kernel, c.sigma,
                           c.border, c.symmetric)

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, step_index: int) -> torch.Tensor:
        if not self.config.active or step_index >= self.config.steps or not self.has_pairs:
            return latents
        eta = float(self.step_sizes[step_index])
        for inner in range(self.config.inner_steps):
            with torch.enable_grad():
                variable = latents.detach().requires_grad_(True)
                losses = self.losses(variable, timestep)
                self.trace.append((step_index, inner, losses.detach().tolist()))
                if not bool((losses > 0).any()):
                    break  # zero loss, zero gradient: further inner steps would not move the latents
                # autograd.grad with inputs=latents: the UNet's weight gradients are never computed
                (gradient,) = torch.autograd.grad(losses.sum(), variable)
            latents = latents - eta * gradient.to(latents.dtype)
        return latents


class _MapAccumulator(CrossAttentionMapRecorder):
    """Records the denoising calls' maps (all cross-attention layers); off during LODA's own passes."""

    def __init__(self, token_positions: torch.Tensor):
        super().__init__(token_positions)
        self.active = True

    def wants_probs(self, layer):
        return self.active and super().wants_probs(layer)


class LodaBatch:
    """One batch of requests through the whole denoising loop (``settings``: the catalog's
    ``GenerateConfig`` with ``steps``, ``guidance_scale`` and ``loda``)."""

    def __init__(self, core: SamplingCore, requests: Sequence[SampleRequest], concepts: Sequence[str],
                 resolution: int, settings, want_maps: bool):
        self.core = core
        self.concepts = list(concepts)
        self.settings = settings
        self.config: LodaConfig = settings.loda
        self.want_maps = want_maps
        prompts = [r.prompt for r in requests]
        self.valid = named_concepts(prompts, self.concepts)
        self.text = core.encode(prompts, self.concepts)
        self.uncond = core.encode_uncond(len(requests))
        self.latents = core.initial_latents([r.seed for r in requests], resolution)
        self.map_size = self.latents.shape[-1]
        positions = concept_token_positions(prompts, core.pipeline.tokenizer, self.concepts, self.valid)
        self.guidance = LodaGuide(core, self.text, positions, self.valid, self.config, settings.steps, self.map_size)
        # the denoising call's rows are [uncond, text]: the unconditional rows read token 0 and are dropped
        self.accumulator = _MapAccumulator(torch.cat([torch.zeros_like(positions), positions]))
        self.accumulator.active = want_maps
        self.map_sum = torch.zeros(len(requests), len(self.concepts), self.map_size, self.map_size)

    @property
    def plain(self) -> bool:
        return not (self.config.active or self.want_maps)

    def _accumulate(self) -> None:
        if self.want_maps and self.accumulator.maps:
            rows = slice(len(self.valid), 2 * len(self.valid))
            layer_maps = [maps[rows] for maps in self.accumulator.maps.values()]
            self.map_sum += mean_concept_maps(layer_maps, len(self.concepts), self.map_size).float().cpu()
        self.accumulator.clear()

    def guide(self, latents: torch.Tensor, timestep: torch.Tensor, step_index: int) -> torch.Tensor:
        self._accumulate()  # the previous step's denoising call
        self.accumulator.active = False
        latents = self.guidance(latents, timestep, step_index)
        self.accumulator.active = self.want_maps
        return latents

    def run(self) -> torch.Tensor:
        """The final latents."""
        steps, scale = self.settings.steps, self.settings.guidance_scale
        if self.plain:  # exactly the fused sampler's call: no hook, no guide
            return self.core.denoise(self.latents, self.text, steps, uncond=self.uncond, guidance_scale=scale)
        latents = self.core.denoise(self.latents, self.text, steps, uncond=self.uncond, guidance_scale=scale,
                                    hooks=(self.accumulator,) if self.want_maps else (), guide=self.guide)
        self._accumulate()
        return latents

    def attention_maps(self) -> list[dict[str, np.ndarray]]:
        mean = normalize_maps(self.map_sum / self.settings.steps).numpy().astype(np.float32)
        return [{name: mean[i, k] for k, name in enumerate(self.concepts) if self.valid[i, k]}
                for i in range(mean.shape[0])]


def sample_loda(core_or_pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str], resolution: int,
                settings, attention_maps: bool = True, description: str = "loda",
                batches: list | None = None) -> SamplingResult:
    """LODA images for ``requests`` (``settings.batch_size`` at a time, request order) and, if
    asked, their concept attention maps. ``batches``, if given, receives each ``LodaBatch``
    (its ``guidance.trace`` holds the losses of every LODA pass)."""
    core = SamplingCore.of(core_or_pipeline)
    images: list[Image.Image] = []
    maps: list[dict[str, np.ndarray]] = []
    for start in tqdm(range(0, len(requests), settings.batch_size), desc=description, leave=False):
        chunk = requests[start : start + settings.batch_size]
        batch = LodaBatch(core, chunk, concepts, resolution, settings, attention_maps)
        images.extend(core.decode(batch.run()))
        if attention_maps:
            maps.extend(batch.attention_maps())
        if batches is not None:
            batches.append(batch)
    return SamplingResult(images, maps if attention_maps else None)


def sample(core_or_pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str], resolution: int, settings,
           description: str = "generate") -> SamplingResult:
    """The registry's entry point: LODA images with their attention maps, and the plain fused
    images of the same requests (same steps and seeds) for comparison."""
    core = SamplingCore.of(core_or_pipeline)
    plain = sample_images(core, requests, concepts, resolution, settings.steps, settings.guidance_scale,
                          settings.batch_size, description=f"{description} (plain)")
    result = sample_loda(core, requests, concepts, resolution, settings, description=description)
    return SamplingResult(result.images, result.attention_maps, plain)
