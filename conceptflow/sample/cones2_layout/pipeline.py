"""Cones 2 layout guidance as a sampler: the sampling core's ``denoise`` with the layout bias hook.

Each batch of requests runs the fused sampler's loop (DPM-Solver++, classifier-free guidance on
``[uncond, cond]``, one seed per image) with:

- ``LayoutBiasHook`` in the cross-attention layers (all of them, or with ``high_resolution_only`` the
  higher half of the resolutions), its sigma set before each UNet call by the per-step ``guide``
  (the scheduler's sigma of that step, the noise level of the latents the UNet sees);
- with ``sigma_aware_cfg`` a per-step guidance scale (``guidance.sigma_cfg_scale``);
- with ``pad_prompts`` the padding keys past each prompt's own length masked out of every
  cross-attention softmax (same hook).

Boxes: the request's (the catalog's ``Combination.layout``) for the concepts its prompt names, or,
without a layout, side-by-side columns over those concepts in the order the prompt mentions them
(``boxes.resolve_boxes``). With ``guidance_weight`` 0, the switches off and no maps asked for, no hook
is installed and the images are the fused sampler's (``fused.sample_images``) bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from conceptflow.adapters.tokens import expand_prompt, prompt_words
from conceptflow.attention.processor import AttentionHook, AttentionLayer, CrossAttentionMapRecorder
from conceptflow.sample.boxes import Box, box_masks, resolve_boxes
from conceptflow.sample.conceptflow_m.pipeline import concept_token_positions, named_concepts
from conceptflow.sample.conceptflow_m.sama import mean_concept_maps, normalize_maps
from conceptflow.sample.cones2_layout.config import Cones2LayoutConfig
from conceptflow.sample.cones2_layout.guidance import LayoutBiasHook, high_resolution_layers, sigma_cfg_scale
from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.sample.fused import sample_images
from conceptflow.sample.registry import SamplingResult
from conceptflow.schema import CONCEPT_REFERENCE


def image_boxes(request: SampleRequest, concepts: Sequence[str]) -> dict[str, Box]:
    """The boxes of the concepts the request's prompt names: its layout's, or, without one, side-by-side
    columns over them in the order the prompt first mentions them ("a <b> on the left and a <a> on the
    right": <b> left)."""
    known = set(concepts)
    names = list(dict.fromkeys(name for name in CONCEPT_REFERENCE.findall(request.prompt) if name in known))
    return resolve_boxes(names, request.boxes) if names else {}


def prompt_lengths(prompts: Sequence[str], tokenizer, concepts: Sequence[str]) -> list[int]:
    """Each prompt's token count with BOS and EOS (at most the tokenizer's 77): its unpadded text length."""
    return [len(tokenizer(expand_prompt(prompt, 0, concepts, prompt_words(tokenizer)), truncation=True,
                          max_length=tokenizer.model_max_length).input_ids) for prompt in prompts]


class ConceptMapAccumulator(AttentionHook):
    """Sums the concepts' cross-attention maps of the conditional half over layers and steps.

    ``mean()`` (N, K, size, size): the mean over steps, cross-attention layers, heads and each
    concept's two tokens, at ``size`` (latent resolution), as ConceptFlow-M reports them.
    """

    def __init__(self, positions: torch.Tensor, n_concepts: int, size: int):
        self.recorder = CrossAttentionMapRecorder(positions)
        self.n_images, self.n_concepts, self.size = positions.shape[0], n_concepts, size
        self.total = torch.zeros(self.n_images, n_concepts, size, size)
        self.count = 0

    def wants_probs(self, layer: AttentionLayer) -> bool:
        return layer.is_cross

    def on_probs(self, layer: AttentionLayer, probs: torch.Tensor) -> None:
        self.recorder.on_probs(layer, probs[-self.n_images :])  # the conditional half
        token_maps = self.recorder.maps.pop(layer.name)
        self.total += mean_concept_maps([token_maps], self.n_concepts, self.size).float().cpu()
        self.count += 1

    def mean(self) -> torch.Tensor:
        if not self.count:
            raise RuntimeError("no cross-attention maps were recorded")
        return self.total / self.count


class Cones2LayoutBatch:
    """One batch of requests through the whole denoising loop. ``settings`` is the catalog's
    ``GenerateConfig`` (``steps``, ``guidance_scale`` and ``cones2_layout``)."""

    def __init__(self, core: SamplingCore, requests: Sequence[SampleRequest], concepts: Sequence[str],
                 resolution: int, settings, want_maps: bool):
        self.core = core
        self.concepts = list(concepts)
        self.settings = settings
        self.config: Cones2LayoutConfig = settings.cones2_layout
        config, tokenizer = self.config, core.pipeline.tokenizer
        prompts = [r.prompt for r in requests]
        self.valid = named_concepts(prompts, self.concepts)
        self.boxes = [image_boxes(r, self.concepts) for r in requests]
        self.text = core.encode(prompts, self.concepts)
        self.uncond = core.encode_uncond(len(requests))
        self.latents = core.initial_latents([r.seed for r in requests], resolution)
        self.map_size = self.latents.shape[-1]
        self.positions = concept_token_positions(prompts, tokenizer, self.concepts, self.valid)
        self.sigmas = core.scheduler(settings.steps, "cpu").sigmas  # the steps' noise levels (denoise's scheduler)
        layers = core.controller.layers
        bias_layers = (high_resolution_layers(core.unet, layers) if config.high_resolution_only
                       else {layer.name for layer in layers if layer.is_cross})
        lengths = prompt_lengths(prompts, tokenizer, self.concepts) if config.pad_prompts else None
        self.bias = None
        if config.guidance_weight != 0 or config.pad_prompts:
            self.bias = LayoutBiasHook(self.boxes, self.concepts, self.positions, self.valid, config.guidance_weight,
                                       config.inside_weight, config.outside_weight, bias_layers, lengths)
        self.maps = ConceptMapAccumulator(self.positions, len(self.concepts), self.map_size) if want_maps else None

    @property
    def plain(self) -> bool:
        return self.bias is None and self.maps is None and not self.config.sigma_aware_cfg

    def sigma(self, step_index: int) -> float:
        return float(self.sigmas[step_index])

    def guidance_scale(self, step_index: int) -> float:
        return sigma_cfg_scale(self.settings.guidance_scale, self.sigma(step_index), self.sigma(0),
                               self.config.sigma_cfg_floor)

    def guide(self, latents: torch.Tensor, timestep: torch.Tensor, step_index: int) -> torch.Tensor:
        self.bias.sigma = self.sigma(step_index)  # the latents are not moved: the bias acts inside the UNet
        return latents

    def run(self) -> torch.Tensor:
        """The final latents."""
        steps = self.settings.steps
        if self.plain:  # exactly the fused sampler's call: no hook, no guide
            return self.core.denoise(self.latents, self.text, steps, uncond=self.uncond,
                                     guidance_scale=self.settings.guidance_scale)
        scale = self.guidance_scale if self.config.sigma_aware_cfg else self.settings.guidance_scale
        hooks = tuple(hook for hook in (self.bias, self.maps) if hook is not None)
        return self.core.denoise(self.latents, self.text, steps, uncond=self.uncond, guidance_scale=scale,
                                 hooks=hooks, guide=None if self.bias is None else self.guide)

    def raw_maps(self) -> torch.Tensor:
        """(N, K, H, W) the concepts' mean cross-attention maps (not normalised; zero for unnamed concepts)."""
        return self.maps.mean() * self.valid[:, :, None, None]

    def attention_maps(self) -> list[dict[str, np.ndarray]]:
        mean = normalize_maps(self.maps.mean()).numpy().astype(np.float32)
        return [{name: mean[i, k] for k, name in enumerate(self.concepts) if self.valid[i, k]}
                for i in range(mean.shape[0])]

    def box_masks(self) -> list[dict[str, np.ndarray]]:
        """Each image's boxes as (H, W) {0, 1} masks at latent resolution (shown beside the maps)."""
        return [{name: box_masks({name: box}, self.map_size)[0].numpy() for name, box in image_boxes.items()}
                for image_boxes in self.boxes]


def sample_cones2_layout(core_or_pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str],
                         resolution: int, settings, attention_maps: bool = True,
                         description: str = "cones2-layout") -> SamplingResult:
    """Layout-guided images for ``requests`` (in order, ``settings.batch_size`` at a time, the fused
    sampler's batches) and, if asked, the concepts' attention maps (min-max normalised to [0, 1]) and
    their boxes (``result.masks``)."""
    core = SamplingCore.of(core_or_pipeline)
    images: list[Image.Image] = []
    maps: list[dict[str, np.ndarray]] = []
    masks: list[dict[str, np.ndarray]] = []
    for start in tqdm(range(0, len(requests), settings.batch_size), desc=description, leave=False):
        batch = Cones2LayoutBatch(core, requests[start : start + settings.batch_size], concepts, resolution,
                                  settings, attention_maps)
        images.extend(core.decode(batch.run()))
        if attention_maps:
            maps.extend(batch.attention_maps())
        masks.extend(batch.box_masks())
    result = SamplingResult(images, maps if attention_maps else None)
    result.masks = masks  # the generate stage saves a sampler's per-concept masks beside its maps
    return result


def sample(core_or_pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str], resolution: int, settings,
           description: str = "generate") -> SamplingResult:
    """The registry's entry point: layout-guided images with their attention maps and boxes, and the
    plain fused images of the same requests (same steps and seeds) for comparison."""
    core = SamplingCore.of(core_or_pipeline)
    plain = sample_images(core, requests, concepts, resolution, settings.steps, settings.guidance_scale,
                          settings.batch_size, description=f"{description} (plain)")
    result = sample_cones2_layout(core, requests, concepts, resolution, settings, description=description)
    result.plain_images = plain
    return result
