"""ConceptFlow-M: multi-concept sampling from a fused model with SAMA and layout guidance (§4.2).

The sampler is the sampling core's ``denoise`` (DPM-Solver++ with classifier-free guidance)
with two additions that plug in through the project's attention hooks and the per-step ``guide``:

- SAMA (``sama.py``): reference branches "a photo of a <c>" ride in the same batched UNet call
  as the targets; their warped self-attention values replace the targets' inside each concept's
  mask from step ``sama_start_step`` on.
- Layout-consistency guidance (``layout_guidance.py``): before each step's UNet call the
  targets' latents take a gradient step that keeps each concept's cross-attention layout close
  to the first step's.

With both off and no attention maps asked for, no hook and no guide is installed and the
images are the fused sampler's (``fused.sample_images``) bit for bit. A reference trajectory depends only on its concept,
its seed and the step (nothing flows back from the targets), so the batch holds one reference
per distinct (concept, seed), shared by every target that needs it: by default all references
start from one seed (``reference_seed``), so a batch carries one reference per concept; with
``reference_seed: null`` each image's own seed is used and requests are grouped by seed into
batches so that sharing is as large as the batch allows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from conceptflow.adapters.tokens import expand_prompt, layer_token, prompt_words
from conceptflow.attention.processor import AttentionHook, CrossAttentionMapRecorder
from conceptflow.sample.conceptflow_m.config import ConceptFlowMConfig
from conceptflow.sample.conceptflow_m.layout_guidance import LayoutGuidance, layout_layer_names
from conceptflow.sample.conceptflow_m.sama import (
    BranchLayout,
    SamaHook,
    mean_concept_maps,
    normalize_maps,
    sama_layer_names,
)
from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.sample.fused import sample_images
from conceptflow.sample.registry import SamplingResult
from conceptflow.schema import CONCEPT_REFERENCE

REFERENCE_PROMPT = "a photo of a <{}>"  # §4.2.1: P_k = "a photo of S_k"


def named_concepts(prompts: Sequence[str], concepts: Sequence[str]) -> torch.Tensor:
    """(B, K) bool: which of ``concepts`` each prompt references as ``<name>``."""
    return torch.tensor([[name in set(CONCEPT_REFERENCE.findall(p)) for name in concepts] for p in prompts],
                        dtype=torch.bool).reshape(len(prompts), len(concepts))


def plan_references(seeds: Sequence[int], valid: torch.Tensor, concepts: Sequence[str],
                    reference_seed: int | None) -> tuple[list[tuple[str, int]], BranchLayout]:
    """One reference branch per distinct (concept, seed) the targets need, in first-use order."""
    references: dict[tuple[str, int], int] = {}
    index = torch.zeros(valid.shape, dtype=torch.long)
    for i, seed in enumerate(seeds):
        for k, name in enumerate(concepts):
            if valid[i, k]:
                key = (name, int(seed if reference_seed is None else reference_seed))
                index[i, k] = references.setdefault(key, len(references))
    return list(references), BranchLayout(len(references), len(seeds), index, valid)


def concept_token_positions(prompts: Sequence[str], tokenizer, concepts: Sequence[str],
                            valid: torch.Tensor) -> torch.Tensor:
    """(B, 2K): the positions of each named concept's two tokens (0, the BOS token, where unnamed).

    Every layer's tokens sit at the same positions, so layer 0's expansion gives them
    (``tokens.token_positions`` expands only one concept and so refuses multi-concept prompts).
    """
    positions = torch.zeros(len(prompts), 2 * len(concepts), dtype=torch.long)
    words = prompt_words(tokenizer)  # concepts written as a word (Cones 2): both slots at that word
    for i, prompt in enumerate(prompts):
        ids = tokenizer(expand_prompt(prompt, 0, concepts, words), padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True).input_ids
        for k, name in enumerate(concepts):
            if valid[i, k]:
                for part in (1, 2):  # the first mention's tokens
                    token_id = (tokenizer(words[name], add_special_tokens=False).input_ids[0] if name in words
                                else tokenizer.convert_tokens_to_ids(layer_token(name, part, 0)))
                    positions[i, 2 * k + part - 1] = ids.index(token_id)
    return positions


class _MainPassHooks(AttentionHook):
    """The hooks of the denoising UNet call, switched off while the guidance pass runs."""

    def __init__(self, recorder: CrossAttentionMapRecorder, sama: SamaHook | None):
        self.recorder = recorder
        self.sama = sama
        self.active = True
        self.recording = True

    def wants_probs(self, layer):
        return self.active and self.recording and self.recorder.wants_probs(layer)

    def on_probs(self, layer, probs):
        self.recorder.on_probs(layer, probs)

    def edit_key_value(self, layer, query, key, value, context):
        if self.active and self.sama is not None:
            return self.sama.edit_key_value(layer, query, key, value, context)
        return key, value


class ConceptFlowMBatch:
    """One batch of targets (and their references) through the whole denoising loop.

    ``settings`` is the catalog's ``GenerateConfig`` (``steps``, ``guidance_scale`` and
    ``conceptflow_m``, a ``ConceptFlowMConfig``).
    """

    def __init__(self, core: SamplingCore, requests: Sequence[SampleRequest], concepts: Sequence[str],
                 resolution: int, settings, want_maps: bool):
        self.core = core
        self.concepts = list(concepts)
        self.settings = settings
        self.config: ConceptFlowMConfig = settings.conceptflow_m
        self.want_maps = want_maps
        self.controller = core.controller
        prompts = [r.prompt for r in requests]
        seeds = [r.seed for r in requests]
        self.valid = named_concepts(prompts, self.concepts)
        reference_keys, self.layout = plan_references(
            seeds, self.valid if self.config.sama else torch.zeros_like(self.valid), self.concepts,
            self.config.reference_seed)
        self.reference_keys = reference_keys
        self.text = core.encode([REFERENCE_PROMPT.format(name) for name, _ in reference_keys] + prompts, self.concepts)
        self.uncond = core.encode_uncond(self.layout.n_rows)
        self.latents = core.initial_latents([seed for _, seed in reference_keys] + seeds, resolution)
        self.target_positions = concept_token_positions(prompts, core.pipeline.tokenizer, self.concepts, self.valid)
        self.map_size = self.latents.shape[-1]
        self.map_sum = torch.zeros(len(requests), len(self.concepts), self.map_size, self.map_size)
        self._build_hooks()

    @property
    def plain(self) -> bool:
        return not (self.config.sama or self.config.layout_guidance or self.want_maps)

    def _build_hooks(self) -> None:
        layers, config, layout = self.controller.layers, self.config, self.layout
        self.layout_layers = layout_layer_names(layers, config.layout_last_block)
        recorded = {layer.name for layer in layers if layer.is_cross} if self.want_maps else set()
        if config.layout_guidance:
            recorded |= set(self.layout_layers)
        self.sama = None
        if config.sama:
            sama_layers, _ = sama_layer_names(layers)
            last = max(i for i, layer in enumerate(layers) if layer.name in sama_layers)
            recorded |= {layer.name for layer in layers[:last] if layer.is_cross}  # masks: "so far" in the call
        positions = torch.zeros(2 * layout.n_rows, self.target_positions.shape[1], dtype=torch.long)
        positions[layout.target_rows(1)] = self.target_positions
        self.recorder = CrossAttentionMapRecorder(positions, sorted(recorded))
        if config.sama:
            self.sama = SamaHook(layout, layers, self.recorder, config.sama_start_step, config.sama_mask_threshold)
        self.main_hooks = _MainPassHooks(self.recorder, self.sama)
        self.guidance = None
        if config.layout_guidance:
            self.guidance = LayoutGuidance(
                self.core.unet, self.controller, self.layout_layers, self.target_positions, self.valid,
                self.settings.steps, config.layout_threshold, config.layout_adjustment, config.layout_step_size,
                self.map_size)

    def _recording_needed(self, step_index: int) -> bool:
        return (self.want_maps or (self.guidance is not None and step_index == 0)
                or (self.sama is not None and step_index >= self.sama.start_step))

    def _target_maps(self, layer_names) -> torch.Tensor:
        rows = self.layout.target_rows(1)
        return mean_concept_maps([self.recorder.maps[name][rows] for name in layer_names], len(self.concepts),
                                 self.map_size)

    def _finish_step(self, step_index: int) -> None:
        if self.want_maps:
            self.map_sum += self._target_maps(list(self.recorder.maps)).float().cpu()
        if self.guidance is not None and step_index == 0:
            self.guidance.set_initial_maps(self._target_maps(self.layout_layers))

    def guide(self, latents: torch.Tensor, timestep: torch.Tensor, step_index: int) -> torch.Tensor:
        if step_index > 0:
            self._finish_step(step_index - 1)
        if self.guidance is not None and step_index > 0:
            self.main_hooks.active = False
            references, targets = latents[: self.layout.n_references], latents[self.layout.n_references :]
            targets = self.guidance(targets, timestep, self.text[self.layout.n_references :], step_index)
            latents = torch.cat([references, targets])
            self.main_hooks.active = True
        self.recorder.clear()
        self.main_hooks.recording = self._recording_needed(step_index)
        if self.sama is not None:
            self.sama.begin_step(step_index)
        return latents

    def run(self) -> torch.Tensor:
        """The targets' final latents."""
        steps, scale = self.settings.steps, self.settings.guidance_scale
        if self.plain:  # exactly the fused sampler's call: no hook, no guide
            return self.core.denoise(self.latents, self.text, steps, uncond=self.uncond, guidance_scale=scale)
        latents = self.core.denoise(self.latents, self.text, steps, uncond=self.uncond, guidance_scale=scale,
                                    hooks=(self.main_hooks,), guide=self.guide)
        self._finish_step(steps - 1)
        return latents[self.layout.n_references :]

    def attention_maps(self) -> list[dict[str, np.ndarray]]:
        mean = normalize_maps(self.map_sum / self.settings.steps).numpy().astype(np.float32)
        return [{name: mean[i, k] for k, name in enumerate(self.concepts) if self.valid[i, k]}
                for i in range(mean.shape[0])]


def batch_order(requests: Sequence[SampleRequest], config: ConceptFlowMConfig) -> list[int]:
    """Request indices in sampling order: grouped by seed when references follow the image's seed
    (so a batch shares references), else as given (the fused sampler's order)."""
    if config.sama and config.reference_seed is None:
        return sorted(range(len(requests)), key=lambda i: requests[i].seed)
    return list(range(len(requests)))


def sample_conceptflow_m(core_or_pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str],
                         resolution: int, settings, attention_maps: bool = True,
                         description: str = "conceptflow-m") -> SamplingResult:
    """ConceptFlow-M images for ``requests`` and, if asked, their concept attention maps.

    ``settings.conceptflow_m`` switches SAMA and layout guidance and holds their parameters;
    ``settings.steps``/``guidance_scale``/``batch_size`` are the fused sampler's. A map
    (``attention_maps[i][concept]``) is the mean over steps, cross-attention layers, heads and
    the concept's two tokens, at latent resolution, min-max normalised to [0, 1].
    """
    core = SamplingCore.of(core_or_pipeline)
    order = batch_order(requests, settings.conceptflow_m)
    images: list[Image.Image | None] = [None] * len(requests)
    maps: list[dict[str, np.ndarray] | None] = [None] * len(requests)
    for start in tqdm(range(0, len(order), settings.batch_size), desc=description, leave=False):
        indices = order[start : start + settings.batch_size]
        chunk = ConceptFlowMBatch(core, [requests[i] for i in indices], concepts, resolution, settings, attention_maps)
        decoded = core.decode(chunk.run())
        chunk_maps = chunk.attention_maps() if attention_maps else [None] * len(indices)
        for i, image, image_maps in zip(indices, decoded, chunk_maps):
            images[i], maps[i] = image, image_maps
    return SamplingResult(images, maps if attention_maps else None)


def sample(core_or_pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str], resolution: int, settings,
           description: str = "generate") -> SamplingResult:
    """The registry's entry point: ConceptFlow-M images with their attention maps, and the plain
    fused images of the same requests (same steps and seeds) for comparison."""
    core = SamplingCore.of(core_or_pipeline)
    plain = sample_images(core, requests, concepts, resolution, settings.steps, settings.guidance_scale,
                          settings.batch_size, description=f"{description} (plain)")
    result = sample_conceptflow_m(core, requests, concepts, resolution, settings, description=description)
    return SamplingResult(result.images, result.attention_maps, plain)
