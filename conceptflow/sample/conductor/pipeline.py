"""Concept Conductor (seed 004): separate concept branches on shared latents, layout alignment and
concept injection, every branch of a batch in one UNet call with per-sample adapters.

Per image: a base branch (the base prompt: every ``<concept>`` by its class word, no adapter) and
one branch per concept of its prompt (that concept as ``<name>``, the others as class words, the
concept's own adapter at ``lora_scale``; ``prompts.py``). As in the paper and the reference code,
all branches of an image share one latent and only the base branch's noise prediction steps it;
the concept branches contribute through their attention outputs. Each step:

1. layout alignment (the first ``alignment_end_fraction`` of the steps): a gradient pass of all
   rows (text-conditioned, no guidance, stopped after the alignment layer) gives each branch's
   self-attention keys; loss = Σ_images [MSE(base, ref) + mean_i MSE(custom_i, ref) ·
   custom_loss_weight] against the keys of the layout reference's DDIM inversion at this timestep
   (``inversion.py``); latents -= alignment_weight · ∇loss;
2. the denoising call (classifier-free guidance): every decoder attention output of each base row
   becomes base·(1 − ΣM_i) + Σ custom_i·M_i (``hooks.py``); masks start from the request's boxes
   (or the side-by-side default; a position in two boxes goes to the smaller): with
   ``masks_from_layout``, per box the best-IoU k-means cluster of the layout reference's inverted
   mask-layer self-attention at the last refinement step's timestep (the reference initialises from
   the reference image's self-attention clusters too, picked by points); they are refined at the
   refinement steps from the mask layer's self-attention (``refine``: per concept the best-IoU
   k-means cluster of its branch and of the base branch, their union; positions two concepts claim
   keep the previous masks);
3. the scheduler steps the latents with the base rows' guided noise.

The layout reference is ``request.layout_image`` or, when None, the image the base draws from the
base prompt with the request's seed (plain sampling, no adapter); those drawings are returned as
``plain_images`` (the base model's plain images of the base prompt, same seeds and steps).

The sampling core's scheduler (DPM-Solver++) is used, not the reference's 200-step DDIM, so that
every sampler shares one loop; step indices are fractions of the configured steps. With
alignment and injection both off the images are plain sampling of the base prompt (the concept
rows still run, their outputs unused). ``ConductorBatch._unet`` is the one place the UNet runs:
``benchmarks/conductor.py`` overrides it with the reference's strategy (a deep copy of the UNet
per branch per step, that branch's adapter merged into it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from conceptflow.adapters.branched import branched_concepts
from conceptflow.attention.processor import StopForward
from conceptflow.errors import ConceptflowError
from conceptflow.sample.boxes import box_masks, resolve_boxes
from conceptflow.sample.conceptflow_m.pipeline import concept_token_positions
from conceptflow.sample.conductor.config import ConductorConfig
from conceptflow.sample.conductor.hooks import ConductorHooks, Row, resolve_layers
from conceptflow.sample.conductor.inversion import invert_keys
from conceptflow.sample.conductor.masks import cluster_candidates, refine_masks, refine_step
from conceptflow.sample.conductor.prompts import branch_prompt, class_words_of, concepts_of
from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.sample.registry import SamplingResult


def disjoint_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(K, h, w) box masks with every position claimed by several boxes given to the smallest."""
    if len(boxes) < 2:
        return boxes
    area = boxes.flatten(1).sum(1)
    owner = torch.where(boxes > 0, area[:, None, None], torch.inf).argmin(0)
    return boxes * (owner[None] == torch.arange(len(boxes))[:, None, None])


class ConductorBatch:
    """One batch of requests through the whole denoising loop (``run``)."""

    def __init__(self, core: SamplingCore, requests: Sequence[SampleRequest], adapters: Mapping[str, object],
                 resolution: int, settings, want_maps: bool = True, cache_dir: Path | None = None,
                 layout_images: Sequence[Image.Image] | None = None):
        self.core, self.settings, self.resolution = core, settings, resolution
        self.config: ConductorConfig = getattr(settings, "conductor", None) or ConductorConfig()
        self.want_maps, self.cache_dir = want_maps, cache_dir
        self.requests = list(requests)
        self.class_words = class_words_of(adapters)
        self.image_concepts = [concepts_of(r.prompt) for r in self.requests]
        unknown = sorted({n for names in self.image_concepts for n in names} - set(adapters))
        if unknown:
            raise ConceptflowError(f"prompts reference {unknown}, which have no adapter (have: {sorted(adapters)})")
        self.names = list(dict.fromkeys(n for names in self.image_concepts for n in names))
        self.branches = [[]] + [[adapters[n]] for n in self.names]
        self.rows: list[Row] = []
        prompts: list[str] = []
        for i, (request, names) in enumerate(zip(self.requests, self.image_concepts)):
            self.rows.append(Row(i, 0, 0))
            prompts.append(branch_prompt(request.prompt, self.class_words))
            for j, name in enumerate(names, start=1):
                self.rows.append(Row(i, j, 1 + self.names.index(name)))
                prompts.append(branch_prompt(request.prompt, self.class_words, keep=name))
        # rows sorted by adapter (stable: images stay in order within an adapter), so each branch's
        # rows are one contiguous run per guidance half and its linears run on slices, not gathers
        order = sorted(range(len(self.rows)), key=lambda r: self.rows[r].adapter)
        self.rows = [self.rows[r] for r in order]
        self.row_prompts = [prompts[r] for r in order]
        prompts = self.row_prompts
        self.base_prompts = [prompts[r] for r, row in enumerate(self.rows) if row.branch == 0]
        self.row_image = torch.tensor([row.image for row in self.rows])
        self.base_rows = torch.tensor([r for r, row in enumerate(self.rows) if row.branch == 0])
        layers = core.controller.layers
        self.alignment_layer, self.mask_layer, self.map_layer = resolve_layers(
            layers, self.config.alignment_layer, self.config.mask_layer)
        self.hooks = ConductorHooks(layers, self.alignment_layer, self.mask_layer, self.map_layer)
        self.steps = settings.steps
        self.alignment_end, refine_steps = self.config.step_indices(self.steps)
        self.refine_steps = set(refine_steps)
        self.layout_images = layout_images
        self.last_losses: list[float] = []

    # ------------------------------------------------------------------ setup
    def _mask_side(self) -> int:
        """The mask layer's map side: up block b of an n-block SD UNet works at latent / 2^(n-1-b)."""
        layer = next(layer for layer in self.core.controller.layers if layer.name == self.mask_layer)
        n_blocks = len(self.core.unet.config.block_out_channels)
        latent = self.resolution // 2 ** (len(self.core.pipeline.vae.config.block_out_channels) - 1)
        return latent // 2 ** (n_blocks - 1 - layer.block_index)

    def _sides(self) -> list[int]:
        """Map sides of the decoder's attention layers and of the mask layer (the fusion masks' resolutions)."""
        n_blocks = len(self.core.unet.config.block_out_channels)
        latent = self.resolution // 2 ** (len(self.core.pipeline.vae.config.block_out_channels) - 1)
        blocks = {layer.block_index for layer in self.core.controller.layers if layer.block == "up_blocks"}
        return sorted({latent // 2 ** (n_blocks - 1 - b) for b in blocks} | {self._mask_side()})

    def _initial_masks(self, side: int) -> None:
        self.side = side
        self.boxes: dict[int, torch.Tensor] = {}
        self.custom_masks, self.base_masks = {}, {}
        for i, (request, names) in enumerate(zip(self.requests, self.image_concepts)):
            boxes = (disjoint_boxes(box_masks(resolve_boxes(names, request.boxes), side)) if names
                     else torch.zeros(0, side, side))
            self.boxes[i] = boxes.flatten(1)
            self._set_initial(i, self.boxes[i])

    def _set_initial(self, image: int, masks: torch.Tensor) -> None:
        """(K, side*side) initial masks: each source's previous choice and the fusion masks."""
        self.custom_masks[image], self.base_masks[image] = masks.clone(), masks.clone()
        self.hooks.set_masks(image, masks.reshape(-1, self.side, self.side), self._sides())

    def plain_base(self) -> torch.Tensor:
        """Plain sampling of the base prompts (no adapter, no hook): final latents."""
        core = self.core
        latents = core.initial_latents([r.seed for r in self.requests], self.resolution)
        return core.denoise(latents, core.encode(self.base_prompts), self.steps,
                            uncond=core.encode_uncond(len(self.requests)), guidance_scale=self.settings.guidance_scale)

    def _reference(self, timesteps) -> list[dict] | None:
        """The layout references' inversions (keys per timestep, mask-layer probabilities), when used."""
        config = self.config
        aligning = config.alignment and self.alignment_end > 0
        if not (aligning or (config.injection and config.masks_from_layout)):
            return None
        if self.layout_images is None:
            raise ConceptflowError("layout alignment and layout masks need a layout image per request")
        timesteps = [int(t) for t in timesteps]
        mask_step = max(self.refine_steps) if self.refine_steps else len(timesteps) // 2
        mask_timestep = timesteps[min(mask_step, len(timesteps) - 1)] if config.masks_from_layout else None
        return [invert_keys(self.core, image, prompt, timesteps, self.alignment_layer, self.resolution,
                            config.inversion_substeps, self.cache_dir, self.mask_layer if mask_timestep else None,
                            mask_timestep)
                for image, prompt in zip(self.layout_images, self.base_prompts)]

    def _layout_masks(self, reference: list[dict] | None) -> None:
        """Initial masks from the layout reference: refine_masks of its self-attention against the boxes."""
        if reference is None or not (self.config.injection and self.config.masks_from_layout):
            return
        for i, names in enumerate(self.image_concepts):
            probs = reference[i].get("mask_probs")
            if not names or probs is None:
                continue
            boxes = self.boxes[i]
            self._set_initial(i, refine_masks(probs, boxes, boxes, n_prompts=len(names) + 1,
                                              overlap_threshold=self.config.overlap_threshold,
                                              n_init=self.config.kmeans_inits))

    # ------------------------------------------------------------------ the UNet
    def _unet(self, sample: torch.Tensor, timestep, conditioning: torch.Tensor, rows: Sequence[Row]):
        """Noise prediction of one call holding ``rows`` (per half); None when the call stopped early."""
        self.hooks.begin_call(rows)
        try:
            return self.core.unet(sample, timestep, encoder_hidden_states=conditioning).sample
        except StopForward:
            return None

    # ------------------------------------------------------------------ steps
    def alignment_loss(self, reference: list[dict[int, torch.Tensor]], timestep: int) -> torch.Tensor:
        """Σ_images [MSE(base keys, ref) + mean_i MSE(custom_i keys, ref) · custom_loss_weight]."""
        total = 0
        for i, names in enumerate(self.image_concepts):
            ref = reference[i]["keys"][timestep].to(self.hooks.keys[(i, 0)].device)
            loss = F.mse_loss(self.hooks.keys[(i, 0)].float(), ref)
            if names:
                customs = torch.stack([F.mse_loss(self.hooks.keys[(i, j)].float(), ref)
                                       for j in range(1, len(names) + 1)])
                loss = loss + customs.mean() * self.config.custom_loss_weight
            total = total + loss
        return total

    def alignment_gradient(self, latents, timestep, scheduler, reference) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, d loss / d latents) of one alignment pass (all rows, text only, no injection)."""
        hooks = self.hooks
        latents = latents.detach().requires_grad_(True)
        hooks.aligning, hooks.fusing, hooks.refining, hooks.mapping = True, False, False, False
        try:
            with torch.enable_grad():
                model_input = scheduler.scale_model_input(latents[self.row_image], timestep)
                self._unet(model_input.to(self.core.model_dtype), timestep, self.text, self.rows)
                loss = self.alignment_loss(reference, int(timestep))
                gradient = torch.autograd.grad(loss, latents)[0]
        finally:
            hooks.aligning = False
            hooks.keys.clear()
        return loss.detach(), gradient

    def _align(self, latents, timestep, scheduler, reference) -> torch.Tensor:
        loss, gradient = self.alignment_gradient(latents, timestep, scheduler, reference)
        self.last_losses.append(float(loss))
        return (latents - self.config.alignment_weight * gradient).detach()

    @torch.no_grad()
    def _denoise_step(self, latents, timestep, scheduler, step_index) -> torch.Tensor:
        hooks, config = self.hooks, self.config
        hooks.fusing = config.injection
        hooks.refining = config.injection and step_index in self.refine_steps
        hooks.mapping = self.want_maps
        rows_in = latents[self.row_image]
        model_input = scheduler.scale_model_input(torch.cat([rows_in, rows_in]), timestep)
        noise = self._unet(model_input.to(self.core.model_dtype), timestep, self.conditioning, self.rows)
        noise = noise.to(latents.dtype)
        n_rows = len(self.rows)
        noise_uncond, noise_text = noise[self.base_rows], noise[n_rows + self.base_rows]
        guided = noise_uncond + self.settings.guidance_scale * (noise_text - noise_uncond)
        if hooks.refining:
            self.refine()
        return scheduler.step(guided, timestep, latents).prev_sample

    def refine(self) -> None:
        """Algorithm 1 (``masks.refine_step``, the reference's semantics) for every image from the
        probabilities the last call recorded: candidates of k-means with n..2n-1 clusters on each
        concept branch's and on the base branch's self-attention."""
        config = self.config
        for i, names in enumerate(self.image_concepts):
            if not names:
                continue
            n_prompts = len(names) + 1
            customs = [cluster_candidates(self.hooks.probs[(i, k)], n_prompts, config.kmeans_inits)
                       for k in range(1, len(names) + 1)]
            base = cluster_candidates(self.hooks.probs[(i, 0)], n_prompts, config.kmeans_inits)
            self.custom_masks[i], self.base_masks[i], self.hooks.masks[i] = refine_step(
                customs, base, self.custom_masks[i], self.base_masks[i], self.hooks.masks[i],
                config.overlap_threshold, (self.side, self.side))
        self.hooks.probs.clear()

    # ------------------------------------------------------------------ the loop
    def _encode(self) -> None:
        core = self.core
        self.text = core.encode(self.row_prompts, self.names)
        self.uncond = core.encode_uncond(len(self.rows))
        self.conditioning = torch.cat([self.uncond, self.text])

    def _token_positions(self) -> None:
        tokenizer = self.core.pipeline.tokenizer
        for r, row in enumerate(self.rows):
            if row.branch:
                name = self.names[row.adapter - 1]
                try:
                    self.hooks.token_positions[(row.image, row.branch)] = concept_token_positions(
                        [self.row_prompts[r]], tokenizer, [name], torch.ones(1, 1, dtype=torch.bool))[0]
                except ValueError:  # a concept without tokens of its own (Cones 2's residual at a word): no map
                    continue

    @contextlib.contextmanager
    def session(self):
        """The branches' adapters (one branch per row), the hooks and the rows' text, for a ``with`` block."""
        core = self.core
        self._initial_masks(self._mask_side())
        with branched_concepts(core.pipeline, self.branches, [row.adapter for row in self.rows],
                               scale=self.config.lora_scale), core.controller.use(self.hooks):
            handles = self.hooks.install(core.unet)
            try:
                self._encode()
                self._token_positions()
                yield self
            finally:
                for handle in handles:
                    handle.remove()

    @property
    def plain(self) -> bool:
        """Nothing for the concept branches to do: no alignment, no injection, no maps."""
        return not (self.config.alignment or self.config.injection or self.want_maps)

    def run(self, force_branches: bool = False) -> torch.Tensor:
        """The images' final latents (the base branches' trajectories). With nothing switched on the
        concept branches cannot change the images and ``plain_base`` runs instead (bit for bit the
        plain sampler), unless ``force_branches``."""
        if self.plain and not force_branches:
            return self.plain_base()
        core = self.core
        scheduler = core.scheduler(self.steps, core.unet.device)
        reference = self._reference(scheduler.timesteps)
        aligning = reference is not None and self.config.alignment
        latents = core.initial_latents([r.seed for r in self.requests], self.resolution) * scheduler.init_noise_sigma
        with self.session():
            self._layout_masks(reference)
            for step_index, timestep in enumerate(scheduler.timesteps):
                self.hooks.clear_step()
                if aligning and step_index < self.alignment_end:
                    latents = self._align(latents, timestep, scheduler, reference)
                latents = self._denoise_step(latents, timestep, scheduler, step_index)
        return latents

    def masks(self) -> list[dict[str, np.ndarray]]:
        """Per image {concept: (h, w) float32 {0, 1}} at the mask layer's resolution."""
        side = self.side
        return [{name: self.hooks.masks[i][side][k].reshape(side, side).numpy().astype(np.float32)
                 for k, name in enumerate(names)} for i, names in enumerate(self.image_concepts)]

    def attention_maps(self) -> list[dict[str, np.ndarray]]:
        """Per image {concept: (h, w) in [0, 1]}: its branch's cross-attention at its tokens, summed
        over steps, min-max normalised."""
        out = []
        for i, names in enumerate(self.image_concepts):
            maps = {}
            for j, name in enumerate(names, start=1):
                total = self.hooks.map_sum.get((i, j))
                if total is None:
                    continue
                side = int(round(total.numel() ** 0.5))
                grid = total.reshape(side, side)
                grid = (grid - grid.min()) / (grid.max() - grid.min()).clamp_min(1e-8)
                maps[name] = grid.numpy().astype(np.float32)
            out.append(maps)
        return out


def _open_layout(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        return opened.convert("RGB")


def sample(core_or_pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str], resolution: int, settings,
           description: str = "generate", adapters: Mapping[str, object] | None = None,
           cache_dir: Path | None = None, batch_class: type[ConductorBatch] = ConductorBatch) -> SamplingResult:
    """The registry's entry point: ``core_or_pipeline`` is the bare base, ``adapters`` {concept:
    ConceptEffects} each concept's own adapter. Returns the images, each concept's attention map,
    the final masks and, as ``plain_images``, the base's plain images of the base prompts (the
    layout references of requests without a layout image). ``cache_dir``: where inversions are
    cached on disk (None: in memory only)."""
    if adapters is None:
        raise ConceptflowError("the conductor sampler needs each concept's own adapter (adapters=)")
    core = SamplingCore.of(core_or_pipeline)
    images, plain, maps, masks = [], [], [], []
    batch_size = settings.batch_size
    for start in tqdm(range(0, len(requests), batch_size), desc=description, leave=False):
        chunk = list(requests[start:start + batch_size])
        batch = batch_class(core, chunk, adapters, resolution, settings, cache_dir=cache_dir)
        drawn = core.decode(batch.plain_base())
        batch.layout_images = [drawn[i] if r.layout_image is None else _open_layout(r.layout_image)
                               for i, r in enumerate(chunk)]
        images.extend(core.decode(batch.run()))
        plain.extend(drawn)
        maps.extend(batch.attention_maps())
        masks.extend(batch.masks())
    return SamplingResult(images, maps, plain, masks=masks)
