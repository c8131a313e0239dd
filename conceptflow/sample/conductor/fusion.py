"""The attention-output fusion of Concept Conductor: out = base*(1 - sum_i M_i) + sum_i custom_i*M_i."""

from __future__ import annotations

import torch

from conceptflow.errors import ConceptflowError


def fuse(base: torch.Tensor, customs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """base (B, N, C), customs (K, B, N, C), masks (K, N) with values in [0, 1] (one per token
    position of this layer's resolution). Returns the fused (B, N, C)."""
    if customs.shape[1:] != base.shape or masks.shape != (customs.shape[0], base.shape[1]):
        raise ConceptflowError(f"fuse: shapes base {tuple(base.shape)}, customs {tuple(customs.shape)}, "
                               f"masks {tuple(masks.shape)} do not match (want customs (K,)+base, masks (K, N))")
    m = masks.to(base.dtype)[:, None, :, None]
    return base * (1 - m.sum(0)) + (customs * m).sum(0)


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A (K, h, w) mask resized to (K, size*size) and binarised at 0.5 (as at each layer's resolution)."""
    out = torch.nn.functional.interpolate(mask[:, None].float(), size=(size, size), mode="bilinear",
                                          align_corners=False)[:, 0]
    return (out > 0.5).float().flatten(1)
