"""Pure loss functions of ConceptFlow-S (no model state; tested on their own).

* :func:`attention_regularisation_loss`: the attention regularisation of ConceptFlow Eq. 5.
* :func:`disentangle_cosine`: DisenBooth's contrastive embedding objective (ConceptFlow Eq. 24).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum"]


def attention_regularisation_loss(ca_rand: torch.Tensor, ca_class: torch.Tensor, mask: torch.Tensor,
                                  reduction: Reduction = "mean") -> torch.Tensor:
    """½ (‖CA(V_rand) ⊙ (1 − M)‖² + ‖CA(V_class) − M‖²), averaged over the batch (Eq. 5, without λ).

    The adjective token V_rand (the randomly initialised ``<name1>``) is penalised for
    attending outside the foreground; the noun token V_class (the class-initialised
    ``<name2>``) is pulled towards the foreground mask itself.

    Args:
        ca_rand: (B, h, w) cross-attention map of V_rand, averaged over layers (``mean_map``).
        ca_class: (B, h, w) the same for V_class.
        mask: (B, h, w) foreground mask M in [0, 1] at the maps' size ((B, 1, h, w) is accepted).
        reduction: ``"sum"`` is the squared Frobenius norm of Eq. 5 as written; ``"mean"``
            (default) divides it by h·w, the per-pixel MSE that Break-a-Scene (Avrahami et al.,
            whom Eq. 5 follows) and Mix-of-Show's attention regularisation use, so that λ does
            not grow with the latent resolution (16² on the tiny base, 64² at 512 px).

    Returns a scalar; zero exactly when CA(V_rand) vanishes where M = 0 and CA(V_class) = M.
    """
    if mask.ndim == ca_class.ndim + 1:
        mask = mask.squeeze(1)
    if not (ca_rand.shape == ca_class.shape == mask.shape):
        raise ValueError(f"maps and mask differ in shape: {tuple(ca_rand.shape)}, {tuple(ca_class.shape)}, "
                         f"{tuple(mask.shape)}")
    mask = mask.to(ca_class.dtype)
    outside = (ca_rand * (1 - mask)).flatten(1).square()
    mismatch = (ca_class - mask).flatten(1).square()
    per_image = outside.sum(dim=1) + mismatch.sum(dim=1)
    if reduction == "mean":
        per_image = per_image / mask[0].numel()
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    return 0.5 * per_image.float().mean()


def disentangle_cosine(text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """cos(f_s, f_i) averaged over the batch (DisenBooth's L_con, ConceptFlow Eq. 24, without λ).

    As DisenBooth's ``cal_cos``, the text side is the mean over all token positions of the
    text encoder's output (not the EOS/pooled feature), and the cosine itself (not its
    absolute value) is minimised. With layer-wise text features the cosine is taken per
    cross-attention layer and averaged, since each layer reads its own encoding.

    Args:
        text_features: (B, tokens, D) or layer-wise (B, layers, tokens, D).
        image_features: (B, D), the image adapter's output f_i.
    """
    text_mean = text_features.float().mean(dim=-2)  # (B, D) or (B, layers, D)
    image = image_features.float()
    if text_mean.ndim == 3:
        image = image.unsqueeze(1).expand_as(text_mean)
    return F.cosine_similarity(text_mean, image, dim=-1, eps=1e-6).mean()
