"""The networks the metrics look through: CLIP (image + text), DINO (image) and LPIPS.

CLIP and DINO load through ``load_transformers_model``, so a hub id
(``openai/clip-vit-large-patch14``, ``facebook/dino-vits16``), a local folder and the embedded
tiny random models (``embedded:tiny-clip``, ``embedded:tiny-dino``) take one code path. Every
``embed_*`` method returns L2-normalised float32 rows on the CPU, so a dot product is a cosine.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from conceptflow.models.loading import load_transformers_model

DEFAULT_BATCH_SIZE = 16
LPIPS_RANDOM_SEED = 0


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [image.convert("RGB") for image in images]


def _batches(items: Sequence, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _normalised(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


class ImageTextEncoder:
    """CLIP: images and texts into one embedding space (CLIP-T, CLIP-I, KID features)."""

    def __init__(self, model_id: str = "embedded:tiny-clip", device: str = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE):
        from transformers import CLIPModel, CLIPProcessor

        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        self.model, self.processor = load_transformers_model(model_id, CLIPModel, CLIPProcessor, device)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) normalised image embeddings (CLIP's projected image features)."""
        rows = []
        for batch in _batches(_rgb(images), self.batch_size):
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            rows.append(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return _normalised(torch.cat(rows)) if rows else torch.empty(0, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) normalised text embeddings; prompts longer than CLIP's 77 tokens are truncated."""
        rows = []
        for batch in _batches(list(texts), self.batch_size):
            tokens = self.processor(text=batch, return_tensors="pt", padding=True, truncation=True)
            rows.append(self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            ))
        return _normalised(torch.cat(rows)) if rows else torch.empty(0, self.model.config.projection_dim)


class _ViTWithoutPooler:
    """``ViTModel`` as DINO checkpoints hold it: no pooler (which would be random and unused)."""

    @staticmethod
    def from_pretrained(source: str):
        from transformers import ViTModel

        return ViTModel.from_pretrained(source, add_pooling_layer=False)


class ImageEncoder:
    """DINO ViT: an image's CLS token after the final layer norm (the DreamBooth DINO score)."""

    def __init__(self, model_id: str = "embedded:tiny-dino", device: str = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE):
        from transformers import AutoImageProcessor

        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        self.model, self.processor = load_transformers_model(
            model_id, _ViTWithoutPooler, AutoImageProcessor, device
        )

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) normalised CLS embeddings."""
        rows = []
        for batch in _batches(_rgb(images), self.batch_size):
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            rows.append(self.model(pixel_values=pixels.to(self.device)).last_hidden_state[:, 0])
        return _normalised(torch.cat(rows)) if rows else torch.empty(0, self.model.config.hidden_size)


def _alexnet_weights_cached() -> bool:
    """Whether torchvision's ImageNet AlexNet is already in the torch hub cache (never downloads)."""
    from torchvision.models import AlexNet_Weights

    filename = AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file()


class PerceptualDistance:
    """LPIPS (AlexNet, v0.1). The linear heads ship with the ``lpips`` package; the AlexNet
    backbone is ImageNet-trained only if torchvision's checkpoint is already cached, otherwise
    it is random (seeded), which keeps LPIPS a metric (0 for equal images) but not a perceptual one.
    """

    def __init__(self, device: str = "cpu", image_size: int | None = None):
        import lpips

        self.device = device
        self.image_size = image_size
        self.pretrained_backbone = _alexnet_weights_cached()
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # lpips still calls torchvision's deprecated ``pretrained=`` argument
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            torch.manual_seed(LPIPS_RANDOM_SEED)
            self.model = lpips.LPIPS(net="alex", pnet_rand=not self.pretrained_backbone, verbose=False)
        self.model.eval().to(device)

    def describe(self) -> str:
        if self.pretrained_backbone:
            return "lpips-v0.1-alex (ImageNet backbone)"
        return (f"lpips-v0.1-alex (random backbone, seed {LPIPS_RANDOM_SEED}: "
                "no ImageNet AlexNet in the torch cache)")

    def _tensor(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1], all resized to ``image_size`` or the first image's size."""
        size = (self.image_size, self.image_size) if self.image_size else images[0].size
        arrays = np.stack([np.asarray(image.resize(size, Image.BICUBIC)) for image in _rgb(images)])
        return (torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(self.device)

    @torch.no_grad()
    def pairwise(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, N) symmetric LPIPS distances between every two images (diagonal 0)."""
        pixels = self._tensor(images)
        count = len(images)
        distances = torch.zeros(count, count)
        first, second = torch.triu_indices(count, count, offset=1)
        for start in range(0, len(first), DEFAULT_BATCH_SIZE):
            i, j = first[start : start + DEFAULT_BATCH_SIZE], second[start : start + DEFAULT_BATCH_SIZE]
            values = self.model(pixels[i], pixels[j]).flatten().float().cpu()
            distances[i, j] = values
            distances[j, i] = values
        return distances
