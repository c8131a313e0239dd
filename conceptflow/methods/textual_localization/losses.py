"""Textual Localization's attention loss (pure functions, tested on their own).

Reference ``textual_localization_{hard,soft}_guidance.py``: per training image and per
resolution, the token's cross-attention map (mean over heads and the layers of that
resolution) is upsampled bilinearly to 256² and min-max normalised; the maps of the
resolutions are averaged; the loss is the MSE to the concept's (min-max normalised) mask,
averaged over the concepts. *hard*: over every pixel; *soft*: multiplied by the mask's zero
area before the mean (the map is free inside the object).
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

EPS = 1e-8


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each (…, h, w) map scaled to [0, 1] over its own pixels; a constant map is left at 0."""
    flat = maps.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    high = flat.max(dim=-1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(EPS)).view_as(maps)


def localization_maps(layer_maps: Mapping[str, torch.Tensor], sides: Sequence[int], size: int) -> torch.Tensor:
    """(B, C, size, size): per concept, the mean over ``sides`` of the min-max normalised,
    upsampled mean map of that side's layers.

    ``layer_maps[name]`` is (B, Q, C): a layer's attention (mean over heads) from each of its
    Q = side² queries to each concept (the sum over the concept's tokens).
    """
    by_side: dict[int, list[torch.Tensor]] = {}
    for token_maps in layer_maps.values():
        batch, queries, concepts = token_maps.shape
        side = int(round(queries ** 0.5))
        if side in sides:
            by_side.setdefault(side, []).append(token_maps.transpose(1, 2).reshape(batch, concepts, side, side))
    if not by_side:
        found = sorted({int(round(m.shape[1] ** 0.5)) for m in layer_maps.values()})
        raise ValueError(f"no cross-attention layer has a side in {list(sides)} (the layers' sides: {found}): "
                         "set train.attention_scales to divisors that exist")
    resized = []
    for side in sorted(by_side):
        mean = torch.stack(by_side[side]).mean(dim=0)
        upsampled = F.interpolate(mean, size=(size, size), mode="bilinear", align_corners=False)
        resized.append(min_max(upsampled))
    return torch.stack(resized).mean(dim=0)


def localization_loss(maps: torch.Tensor, masks: torch.Tensor, guidance: Literal["hard", "soft"] = "hard",
                      present: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over concepts of MSE(map, mask) (``hard``), or of the MSE times the mask's zero
    area (``soft``), each a mean over the batch's pixels as the reference's ``mse_loss``.

    maps, masks: (B, C, h, w), masks in [0, 1] (normalised here by ``min_max``, as the
    reference normalises its masks). ``present``: (B, C) bool, which concepts each prompt names
    (a concept absent from a caption has no map to pull); default all.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
    target = min_max(masks.to(maps.dtype))
    squared = (maps - target) ** 2
    if guidance == "soft":
        squared = squared * (target == 0).to(squared.dtype)
    elif guidance != "hard":
        raise ValueError(f"guidance must be 'hard' or 'soft', not {guidance!r}")
    if present is None:
        present = torch.ones(maps.shape[:2], dtype=torch.bool, device=maps.device)
    per_concept = []
    for concept in range(maps.shape[1]):
        rows = present[:, concept]
        if bool(rows.any()):
            per_concept.append(squared[rows, concept].mean())
    if not per_concept:
        return maps.sum() * 0.0
    return torch.stack(per_concept).mean()
