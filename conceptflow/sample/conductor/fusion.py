"""The attention-output fusion of Concept Conductor, as the reference applies it (``AttnProcessor.merge``
in Nihukat/Concept-Conductor): concept by concept, out <- custom_i*M_i + out*(1 - M_i), starting from
the base branch's output. For disjoint binary masks this is base*(1 - sum_i M_i) + sum_i custom_i*M_i;
where masks overlap the later concept wins (the sum form would extrapolate there)."""

from __future__ import annotations

import torch
from torchvision.transforms.functional import InterpolationMode, resize

from conceptflow.errors import ConceptflowError


def fuse(base: torch.Tensor, customs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """base (B, N, C), customs (K, B, N, C), masks (K, N) with values in [0, 1] (one per token
    position of this layer's resolution). Returns the fused (B, N, C)."""
    if customs.shape[1:] != base.shape or masks.shape != (customs.shape[0], base.shape[1]):
        raise ConceptflowError(f"fuse: shapes base {tuple(base.shape)}, customs {tuple(customs.shape)}, "
                               f"masks {tuple(masks.shape)} do not match (want customs (K,)+base, masks (K, N))")
    out = base
    for custom, m in zip(customs, masks.to(base.dtype)[:, None, :, None]):
        out = custom * m + out * (1 - m)
    return out


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A (K, h, w) mask resized to (K, size*size) (bilinear, antialiased when shrinking, as
    torchvision's Resize in the reference) and binarised at > 0.5."""
    out = resize(mask[:, None].float(), [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)[:, 0]
    return (out > 0.5).float().flatten(1)
