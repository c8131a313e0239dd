"""Attention-map entropy (ConceptSplit Table 1, supplement B).

H = -sum_{m,n} Â(m,n) log Â(m,n), where Â is a token's cross-attention map averaged over layers
(and steps) and turned into a distribution by a softmax over pixels. ΔH is the mean over
diffusion steps of the step-to-step change H_{t+1} - H_t.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from conceptflow.attention.processor import CrossAttentionMapRecorder
from conceptflow.sample.core import SampleRequest, SamplingCore


def map_entropy(attention_map: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(map) over its last two (spatial) dims; leading dims are kept."""
    if attention_map.dim() < 2:
        raise ValueError("attention_map must have at least 2 (spatial) dims, got shape "
                         f"{tuple(attention_map.shape)}")
    flat = attention_map.flatten(-2).double()
    logp = torch.log_softmax(flat, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_change(maps_per_step: torch.Tensor) -> torch.Tensor:
    """Mean step-to-step entropy change of maps shaped (steps, ..., H, W)."""
    if maps_per_step.dim() < 3 or maps_per_step.shape[0] < 2:
        raise ValueError("maps_per_step needs shape (steps>=2, ..., H, W), got "
                         f"{tuple(maps_per_step.shape)}")
    h = map_entropy(maps_per_step)
    return (h[1:] - h[:-1]).mean(0)



def entropy_map_side(latent_side: int, layer_sides: Sequence[int]) -> int:
    """The cross-attention resolution ΔH reads: ConceptSplit's 24 of SD 2.1's 96-wide latents, i.e.
    a quarter of the latent side (16 on SD 1.x at 512 px); the nearest side the UNet has otherwise
    (8 on the toy base's 16-wide latents), the larger one on a tie."""
    target = latent_side / 4
    return min(set(layer_sides), key=lambda side: (abs(math.log(side / target)), -side))


def step_concept_maps(layer_maps: Sequence[torch.Tensor], rows: int, n_concepts: int, latent_side: int) -> torch.Tensor:
    """(rows, K, side, side): the mean over the layers of ``entropy_map_side`` and over each
    concept's two tokens of one UNet call's maps (per layer (2*rows, Q, 2K), CFG's conditional half
    last)."""
    sides = [int(round(maps.shape[1] ** 0.5)) for maps in layer_maps]
    side = entropy_map_side(latent_side, sides)
    chosen = [maps[-rows:] for maps, own in zip(layer_maps, sides) if own == side]
    stacked = torch.stack([m.transpose(1, 2).reshape(rows, n_concepts, 2, side, side).mean(2) for m in chosen])
    return stacked.mean(0)


def sampling_entropy_changes(core_or_pipeline, requests: Sequence[SampleRequest], concepts: Sequence[str],
                             resolution: int, steps: int, guidance_scale: float,
                             batch_size: int = 4) -> list[dict[str, float]]:
    """ΔH of each named concept in each request's plain sampling run (ConceptSplit Table 1).

    Per image and concept: the concept's cross-attention map at every step (the conditional half of
    classifier-free guidance; mean over heads, over the layers of ``entropy_map_side`` and over the
    concept's two tokens), its entropy after a softmax over pixels, and the mean step-to-step
    change. Concepts the prompt does not name are left out of that image's dict.
    """
    from conceptflow.sample.conceptflow_m.pipeline import concept_token_positions, named_concepts

    core = SamplingCore.of(core_or_pipeline)
    concepts = list(concepts)
    changes: list[dict[str, float]] = []
    for start in range(0, len(requests), batch_size):
        chunk = list(requests[start:start + batch_size])
        prompts = [request.prompt for request in chunk]
        valid = named_concepts(prompts, concepts)
        positions = concept_token_positions(prompts, core.pipeline.tokenizer, concepts, valid)
        recorder = CrossAttentionMapRecorder(torch.cat([positions, positions]))  # rows of [uncond, cond]
        latents = core.initial_latents([request.seed for request in chunk], resolution)
        latent_side = latents.shape[-1]
        per_step: list[torch.Tensor] = []

        def harvest(latents_now, timestep, step_index):  # runs before each UNet call: the previous call's maps
            if recorder.maps:
                per_step.append(step_concept_maps(list(recorder.maps.values()), len(chunk), len(concepts), latent_side))
                recorder.clear()
            return latents_now

        text, uncond = core.encode(prompts, concepts), core.encode_uncond(len(chunk))
        with torch.no_grad():
            core.denoise(latents, text, steps, uncond=uncond, guidance_scale=guidance_scale, hooks=(recorder,),
                         guide=harvest)
        harvest(None, None, steps)
        delta = entropy_change(torch.stack(per_step))  # (B, K)
        changes += [{name: float(delta[i, k]) for k, name in enumerate(concepts) if valid[i, k]}
                    for i in range(len(chunk))]
    return changes
