"""What a Textual Localization run trains on: a group's photos, one mask per concept per photo.

Like ``train.common.prepare_concept_training`` for one concept, but every concept of the group
gets its layer tokens, and the masks are kept per concept: (N, C, …) with C the group's
concepts in catalog order. The denoising loss is masked by their union.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from conceptflow.adapters.tokens import (
    ConceptEmbeddings,
    add_concept_tokens,
    concept_token_strings,
    encode_layerwise,
    initial_embeddings,
)
from conceptflow.attention.processor import AttentionController, attention_controller_of
from conceptflow.errors import ConceptflowError
from conceptflow.train.common import PipelineParts, encode_latents, load_training_images

# "{}" is the group's concepts written "<a> and <b>"; a photo with a caption trains with it.
GROUP_PROMPT_TEMPLATES = (
    "a photo of {}",
    "a good photo of {}",
    "a close-up photo of {}",
    "a bright photo of {}",
    "a cropped photo of {}",
    "a photo showing {}",
)


@dataclass(frozen=True)
class GroupMember:
    name: str
    class_word: str
    mask_paths: tuple[Path, ...]  # one per group photo, in the photos' order


@dataclass
class GroupTrainingSetup(PipelineParts):
    pipeline: object
    controller: AttentionController
    members: tuple[GroupMember, ...]
    n_layers: int
    token_strings: list[str]  # every member's layer tokens, member by member
    embeddings: ConceptEmbeddings
    latents: torch.Tensor  # (N, 4, h, w)
    union_masks: torch.Tensor  # (N, 1, h, w): any concept, at latent size (the denoising loss's mask)
    concept_masks: torch.Tensor  # (N, C, s, s) at the attention loss's size
    noise_scheduler: object
    captions: list[str | None]
    prior_latents: torch.Tensor | None = None  # (C, P, 4, h, w): P class-prior images per member's class word
    concept_name: str = ""  # for ConceptTrainer's interface (the group's name)

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    def prompt(self, index: int, template_id: int) -> str:
        if self.captions[index] is not None:
            return self.captions[index]
        return GROUP_PROMPT_TEMPLATES[template_id].format(" and ".join(f"a <{name}>" for name in self.names))

    def class_prompt(self, member: int) -> str:
        return f"a photo of a {self.members[member].class_word}"

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return encode_layerwise(prompts, self.tokenizer, self.text_encoder, self.n_layers, self.names)

    def tokens_of(self, name: str) -> list[str]:
        return concept_token_strings(name, self.n_layers)


def prepare_group_training(pipeline, group_name: str, members: Sequence[GroupMember], image_paths: Sequence[Path],
                           captions: Sequence[str | None], resolution: int, map_size: int, seed: int,
                           prior_pixels: torch.Tensor | None = None) -> GroupTrainingSetup:
    """Tokens of every member (initialised as ED-LoRA's, one generator for the group, members in
    order), latents of the photos, each member's masks; ``prior_pixels`` (C, P, 3, R, R) in [-1, 1]."""
    from diffusers import DDPMScheduler

    for member in members:
        if len(member.mask_paths) != len(image_paths):
            raise ConceptflowError(f"group {group_name}: {len(member.mask_paths)} masks of {member.name} for "
                                   f"{len(image_paths)} photos; run the mask stage for {member.name} again")
    controller = attention_controller_of(pipeline.unet)
    n_layers = controller.n_cross_layers
    generator = torch.Generator().manual_seed(seed)
    token_ids, initial = [], []
    for member in members:
        token_ids += add_concept_tokens(pipeline.tokenizer, pipeline.text_encoder, member.name, n_layers)
        initial.append(initial_embeddings(pipeline.tokenizer, pipeline.text_encoder, member.class_word, n_layers,
                                          generator))
    embeddings = ConceptEmbeddings(token_ids, torch.cat(initial)).to(pipeline.text_encoder.device)
    embeddings.attach(pipeline.text_encoder)

    pixels, _, _ = load_training_images(list(image_paths), None, resolution)
    latents = encode_latents(pipeline.vae, pixels)
    per_member = [load_training_images(list(image_paths), list(member.mask_paths), resolution)[1] for member in members]
    full_masks = torch.cat(per_member, dim=1)  # (N, C, R, R)
    union = full_masks.amax(dim=1, keepdim=True)
    union_latent = F.interpolate(union, size=latents.shape[-2:], mode="bilinear", align_corners=False)
    concept_masks = F.interpolate(full_masks, size=(map_size, map_size), mode="bilinear", align_corners=False)
    prior_latents = None
    if prior_pixels is not None:
        count, per_class = prior_pixels.shape[:2]
        flat = encode_latents(pipeline.vae, prior_pixels.flatten(0, 1))
        prior_latents = flat.view(count, per_class, *flat.shape[1:])
    for model in (pipeline.unet, pipeline.text_encoder, pipeline.vae):
        model.requires_grad_(False)
    device = latents.device
    return GroupTrainingSetup(
        pipeline=pipeline, controller=controller, members=tuple(members), n_layers=n_layers,
        token_strings=[token for member in members for token in concept_token_strings(member.name, n_layers)],
        embeddings=embeddings, latents=latents, union_masks=union_latent.to(device),
        concept_masks=concept_masks.to(device), noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
        captions=list(captions), prior_latents=prior_latents, concept_name=group_name)
