"""LODA's equations (ConceptSplit Algorithm 1, lines 7-14) as pure functions on tiny tensors.

Per image: each named concept's cross-attention map A^i (mean over the chosen layers, heads and
the concept's two tokens) is Gaussian-smoothed and normalised to a distribution P^i (line 9-10);
the loss is ReLU(γ − KL^H) with KL^H the harmonic mean of the pairwise KL(P^i || P^j) (line
12-13); the latent steps z' = z − η_t ∇_z L (line 14) with the reference's
η_i = scale·sqrt(linspace(1, 0.5, T)[i]).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from conceptflow.attention.processor import AttentionLayer

PROBABILITY_EPS = 1e-10  # the reference adds it to both distributions after normalising
KL_FLOOR = 1e-12  # keeps 1/KL finite (and its gradient defined) if two maps coincide


def smooth_maps(maps: torch.Tensor, kernel: int = 7, sigma: float = 2**0.5, border: str = "same") -> torch.Tensor:
    """Gaussian smoothing of maps (..., H, W) with torchvision's ``gaussian_blur``.

    ``border="same"``: reflect padding by kernel // 2, same size. ``"reference"``: the reference's
    ``F.pad(map, 1, reflect)`` then a valid convolution, i.e. (H + 2 − (kernel − 1)) per side.
    """
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:])
    if border == "reference":
        flat = F.pad(flat, (1, 1, 1, 1), mode="reflect")
        crop = kernel // 2
        if flat.shape[-1] - 2 * crop < 1 or flat.shape[-2] - 2 * crop < 1:
            raise ValueError(f"border 'reference' needs map side + 2 >= kernel; got {tuple(shape[-2:])} and {kernel}")
        blurred = gaussian_blur(flat, [kernel, kernel], [sigma, sigma])
        blurred = blurred[..., crop : blurred.shape[-2] - crop, crop : blurred.shape[-1] - crop]
    elif border == "same":
        blurred = gaussian_blur(flat, [kernel, kernel], [sigma, sigma])
    else:
        raise ValueError(f"unknown border {border!r}; known: 'same', 'reference'")
    return blurred.reshape(*shape[:-2], *blurred.shape[-2:])


def to_distributions(maps: torch.Tensor) -> torch.Tensor:
    """P = A / ΣA + ε over the spatial dims (..., H, W) -> (..., H*W), as the reference."""
    flat = maps.flatten(-2)
    return flat / flat.sum(dim=-1, keepdim=True) + PROBABILITY_EPS


def pairwise_kl(distributions: torch.Tensor) -> torch.Tensor:
    """KL(P_i || P_j) for every pair: (..., K, N) -> (..., K, K), entry [i, j]."""
    p = distributions.unsqueeze(-2)  # (..., K, 1, N)
    q = distributions.unsqueeze(-3)  # (..., 1, K, N)
    return (p * (p.log() - q.log())).sum(dim=-1)


def pair_mask(valid: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """(B, K, K) bool: the pairs (i, j) of named concepts the harmonic mean runs over
    (i < j as the reference code, or every i != j with ``symmetric``)."""
    k = valid.shape[-1]
    order = torch.ones(k, k, dtype=torch.bool, device=valid.device)
    order = order.triu(1) if not symmetric else order & ~torch.eye(k, dtype=torch.bool, device=valid.device)
    return valid.unsqueeze(-1) & valid.unsqueeze(-2) & order


def harmonic_mean_kl(distributions: torch.Tensor, valid: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """KL^H per image: n / Σ 1/KL over its named pairs. ``distributions`` (B, K, N), ``valid`` (B, K).
    Images with fewer than two named concepts get +inf (no pair, nothing to separate)."""
    kl = pairwise_kl(distributions).clamp_min(KL_FLOOR)
    mask = pair_mask(valid.to(kl.device), symmetric)
    inverse_sum = torch.where(mask, 1.0 / kl, torch.zeros_like(kl)).flatten(-2).sum(-1)
    count = mask.flatten(-2).sum(-1).to(kl.dtype)
    return torch.where(count > 0, count / inverse_sum.clamp_min(torch.finfo(kl.dtype).tiny),
                       torch.full_like(count, float("inf")))


def loda_losses(maps: torch.Tensor, valid: torch.Tensor, threshold: float = 3.0, kernel: int = 7,
                sigma: float = 2**0.5, border: str = "same", symmetric: bool = False) -> torch.Tensor:
    """ReLU(γ − KL^H) per image from raw concept maps (B, K, H, W); 0 for images with < 2 concepts."""
    distributions = to_distributions(smooth_maps(maps, kernel, sigma, border))
    return torch.relu(threshold - harmonic_mean_kl(distributions, valid, symmetric))


def step_sizes(total_steps: int, scale: float = 20.0, start: float = 1.0, end: float = 0.5) -> np.ndarray:
    """η_i = scale·sqrt(linspace(start, end, total_steps))[i] (the reference's scale_factor·sqrt(scale_range[i]))."""
    return scale * np.sqrt(np.linspace(start, end, total_steps))


# ------------------------------------------------------------------------------ where the maps are read
def cross_layer_sides(layers: Sequence[AttentionLayer], latent_side: int, n_blocks: int) -> dict[str, int]:
    """The spatial side of each cross-attention layer of a diffusers ``UNet2DConditionModel``.

    Every down block but the last halves the side (stride-2 convolution: ceil), the mid block
    sits at the last down block's side and up block j at down block n−1−j's.
    """
    down = [latent_side]
    for _ in range(n_blocks - 1):
        down.append(-(-down[-1] // 2))
    sides = {}
    for layer in layers:
        if not layer.is_cross:
            continue
        if layer.block == "down_blocks":
            sides[layer.name] = down[layer.block_index]
        elif layer.block == "mid_block":
            sides[layer.name] = down[-1]
        else:
            sides[layer.name] = down[n_blocks - 1 - layer.block_index]
    return sides


def choose_map_side(sides: Sequence[int], latent_side: int, requested: int | None = None) -> int:
    """``requested`` if a layer has that side, else (None) the side nearest latent_side / 4, ties to the larger."""
    available = sorted(set(sides))
    if requested is not None:
        if requested not in available:
            raise ValueError(f"no cross-attention layer has side {requested}; the UNet's sides are {available}")
        return requested
    return min(available, key=lambda side: (abs(side - latent_side / 4), -side))


def map_layer_names(layers: Sequence[AttentionLayer], latent_side: int, n_blocks: int,
                    requested: int | None = None) -> tuple[list[str], int]:
    """(the cross-attention layers the loss reads, in UNet order; their side)."""
    sides = cross_layer_sides(layers, latent_side, n_blocks)
    side = choose_map_side(list(sides.values()), latent_side, requested)
    return [layer.name for layer in layers if sides.get(layer.name) == side], side
