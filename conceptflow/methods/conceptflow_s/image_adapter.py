"""DisenBooth's image adapter (ConceptFlow A.1.5, Eq. 21) and the frozen CLIP image features it reads.

    f_i = σ(M) ⊙ e + MLP(σ(M) ⊙ e)

with e the CLIP image embedding of a training image and M a learnable mask initialised to 0
(so σ(M) = 0.5 at the start), which learns to let only identity-irrelevant information
through. f_i is added to every text token during training; it is not used at sampling time.

DisenBooth pairs CLIP ViT-H/14 (image embedding 1024) with SD 2.1 (text width 1024). When
the image embedding and the text encoder differ in width (e.g. a CLIP whose projection is not
the text encoder's hidden size), the skip connection becomes a learnable linear map
(image dim → text dim) and the MLP's first layer maps the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torch import nn

from conceptflow.models.loading import load_transformers_model


class ImageAdapter(nn.Module):
    """f = skip(σ(M)·e) + MLP(σ(M)·e); skip is the identity when the widths agree (Eq. 21).

    Args:
        image_dim: width of the CLIP image embedding e (and of the mask M).
        text_dim: width of the text features f_i is added to; defaults to ``image_dim``.
    """

    def __init__(self, image_dim: int, text_dim: int | None = None):
        super().__init__()
        text_dim = image_dim if text_dim is None else text_dim
        self.image_dim, self.text_dim = image_dim, text_dim
        self.mask = nn.Parameter(torch.zeros(image_dim))
        # DisenBooth's MLP: Linear, ReLU, Linear, all at the embedding width.
        self.mlp = nn.Sequential(nn.Linear(image_dim, text_dim), nn.ReLU(), nn.Linear(text_dim, text_dim))
        self.skip = nn.Identity() if image_dim == text_dim else nn.Linear(image_dim, text_dim, bias=False)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        gated = torch.sigmoid(self.mask) * image_embeddings
        return self.skip(gated) + self.mlp(gated)


@torch.no_grad()
def clip_image_embeddings(images: Sequence[Image.Image], model_id: str, device: str = "cpu") -> torch.Tensor:
    """(N, projection_dim) CLIP image embeddings (projected, not normalised, as DisenBooth's
    ``encode_image``) of ``images`` by the frozen encoder ``model_id`` (hub id, folder or embedded id).

    Loads only the vision tower (``CLIPVisionModelWithProjection`` reads a full ``CLIPModel``
    checkpoint too) and releases it afterwards: the embeddings are computed once per training run.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model, processor = load_transformers_model(model_id, CLIPVisionModelWithProjection, CLIPImageProcessor, device)
    pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    embeddings = model(pixel_values=pixels.to(device, model.dtype)).image_embeds.float()
    del model
    return embeddings
