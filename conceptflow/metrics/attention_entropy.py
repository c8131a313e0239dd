"""Attention-map entropy (ConceptSplit Table 1, supplement B).

H = -sum_{m,n} Â(m,n) log Â(m,n), where Â is a token's cross-attention map averaged over layers
(and steps) and turned into a distribution by a softmax over pixels. ΔH is the mean over
diffusion steps of the step-to-step change H_{t+1} - H_t.
"""
from __future__ import annotations

import torch


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
