"""What every per-concept training method shares: data, the denoising loss, the concept tokens.

A method receives a ``ConceptTrainingSetup`` (a loaded base with the concept's layer tokens
registered, the training images encoded to latents once, the masks at latent size) and
builds its adapter on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from conceptflow.adapters.tokens import (
    ConceptEmbeddings,
    add_concept_tokens,
    concept_token_strings,
    encode_layerwise,
    initial_embeddings,
)
from conceptflow.attention.processor import AttentionController, attention_controller_of

# Mix-of-Show/DreamBooth-style caption templates; "{}" is the concept reference "<name>". An
# image with its own caption (``000.txt`` from ingest) is trained with that caption instead.
PROMPT_TEMPLATES = (
    "a photo of a {}",
    "a photo of the {}",
    "a close-up photo of a {}",
    "a good photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of a {}",
)


class PipelineParts:
    """The models of ``self.pipeline`` by name (for the training setups)."""

    pipeline: object

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def text_encoder(self):
        return self.pipeline.text_encoder

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer


@dataclass
class ConceptTrainingSetup(PipelineParts):
    pipeline: object
    controller: AttentionController
    concept_name: str
    class_word: str
    n_layers: int
    token_strings: list[str]
    embeddings: ConceptEmbeddings
    latents: torch.Tensor  # (N, 4, h, w), already scaled by the VAE scaling factor
    masks: torch.Tensor  # (N, 1, h, w) in [0, 1] at latent size
    full_masks: torch.Tensor  # (N, 1, H, W) at image size
    pixel_images: list[Image.Image]
    noise_scheduler: object
    captions: list[str | None] | None = None  # per image; None: the templates

    def prompt(self, index: int, template_id: int) -> str:
        """The training prompt of image ``index``: its caption, else template ``template_id``."""
        if self.captions and self.captions[index] is not None:
            return self.captions[index]
        return PROMPT_TEMPLATES[template_id].format(f"<{self.concept_name}>")

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_layerwise(prompts, self.tokenizer, self.text_encoder, self.n_layers, [self.concept_name])


def load_training_images(image_paths: list[Path], mask_paths: list[Path] | None, resolution: int):
    """Pixel tensors in [-1, 1] (N, 3, R, R) and masks (N, 1, R, R) in [0, 1] (ones if absent)."""
    pixels, masks, images = [], [], []
    for index, path in enumerate(image_paths):
        image = Image.open(path).convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
        images.append(image)
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
        if mask_paths:
            mask = Image.open(mask_paths[index]).convert("L").resize((resolution, resolution), Image.Resampling.BILINEAR)
            masks.append(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None])
        else:
            masks.append(torch.ones(1, resolution, resolution))
    return torch.stack(pixels), torch.stack(masks), images


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Deterministic latents (the posterior mean), scaled as the UNet expects."""
    pixels = pixels.to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def prepare_concept_training(pipeline, concept_name: str, class_word: str, image_paths: list[Path],
                             mask_paths: list[Path] | None, resolution: int, seed: int,
                             captions: list[str | None] | None = None) -> ConceptTrainingSetup:
    from diffusers import DDPMScheduler

    controller = attention_controller_of(pipeline.unet)
    n_layers = controller.n_cross_layers
    token_ids = add_concept_tokens(pipeline.tokenizer, pipeline.text_encoder, concept_name, n_layers)
    generator = torch.Generator().manual_seed(seed)
    initial = initial_embeddings(pipeline.tokenizer, pipeline.text_encoder, class_word, n_layers, generator)
    embeddings = ConceptEmbeddings(token_ids, initial).to(pipeline.text_encoder.device).attach(pipeline.text_encoder)

    if captions is not None and len(captions) != len(image_paths):
        raise ValueError(f"{len(captions)} captions for {len(image_paths)} images of {concept_name}")
    pixels, full_masks, images = load_training_images(image_paths, mask_paths, resolution)
    latents = encode_latents(pipeline.vae, pixels)
    latent_masks = F.interpolate(full_masks, size=latents.shape[-2:], mode="bilinear", align_corners=False)
    for model in (pipeline.unet, pipeline.text_encoder, pipeline.vae):
        model.requires_grad_(False)
    return ConceptTrainingSetup(
        pipeline=pipeline,
        controller=controller,
        concept_name=concept_name,
        class_word=class_word,
        n_layers=n_layers,
        token_strings=concept_token_strings(concept_name, n_layers),
        embeddings=embeddings,
        latents=latents,
        masks=latent_masks.to(latents.device),
        full_masks=full_masks,
        pixel_images=images,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        captions=list(captions) if captions is not None else None,
    )


@dataclass
class NoisedBatch:
    indices: torch.Tensor
    latents: torch.Tensor
    noisy_latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    masks: torch.Tensor
    prompts: list[str]


def sample_batch(setup: ConceptTrainingSetup, batch_size: int, generator: torch.Generator) -> NoisedBatch:
    """Images, noise, timesteps and prompts of one step, all drawn from ``generator``."""
    count = setup.latents.shape[0]
    indices = torch.randint(0, count, (batch_size,), generator=generator)
    latents = setup.latents[indices]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    timesteps = torch.randint(0, setup.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    template_ids = torch.randint(0, len(PROMPT_TEMPLATES), (batch_size,), generator=generator)
    prompts = [setup.prompt(int(index), int(template)) for index, template in zip(indices, template_ids)]
    noisy = setup.noise_scheduler.add_noise(latents, noise, timesteps.to(latents.device))
    return NoisedBatch(indices, latents, noisy, noise, timesteps.to(latents.device), setup.masks[indices], prompts)


def denoising_loss(prediction: torch.Tensor, batch: NoisedBatch, masked: bool) -> torch.Tensor:
    """MSE to the noise (epsilon prediction), restricted to the foreground when ``masked``."""
    squared = (prediction.float() - batch.noise.float()) ** 2
    if not masked:
        return squared.mean()
    weights = batch.masks.expand_as(squared)
    return (squared * weights).sum() / weights.sum().clamp_min(1.0)


def freeze_embeddings_at_norm(embeddings: ConceptEmbeddings, limit: float) -> None:
    """Mix-of-Show stops updating the token embeddings once their mean norm reaches ``limit``."""
    if embeddings.weight.requires_grad and embeddings.mean_norm() >= limit:
        embeddings.weight.requires_grad_(False)
        embeddings.weight.grad = None
