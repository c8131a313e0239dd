"""BRIA RMBG-1.4 background removal as a mask backend (an explicit opt-in).

RMBG-1.4's model class lives in its hub repository (``briarmbg.py``), so loading it runs
code downloaded with the weights; transformers only does that when ``trust_remote_code`` is
passed. The catalog must say so (``mask.trust_remote_code: true``); otherwise this backend
refuses to load. The weights are under BRIA's non-commercial licence.

Pre/post-processing follows the model card's example:

* pre: RGB uint8 → float, bilinear resize to 1024 x 1024, divide by 255, normalise with mean
  0.5 and std 1.0 per channel (so inputs lie in [-0.5, 0.5]);
* post: the first output (a sigmoid map, ``outputs[0][0]``) is resized bilinearly to the
  image's size and min-max normalised to [0, 1].

``class_word`` is not used: RMBG segments the salient foreground whatever it is.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from conceptflow.data.masks.base import MaskBackend, as_rgb_array, check_mask
from conceptflow.errors import ModelUnavailableError
from conceptflow.models.loading import LOADING_LOCK, model_fingerprint, resolve_model_source

RMBG_INPUT_SIZE = (1024, 1024)
RMBG_MEAN, RMBG_STD = 0.5, 1.0


def rmbg_preprocess(rgb: np.ndarray, input_size: tuple[int, int] = RMBG_INPUT_SIZE) -> torch.Tensor:
    """``H x W x 3`` uint8 → ``1 x 3 x 1024 x 1024`` float32: resize, /255, (x - 0.5) / 1.0."""
    pixels = torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None]
    resized = F.interpolate(pixels, size=input_size, mode="bilinear", align_corners=False)
    return (resized / 255.0 - RMBG_MEAN) / RMBG_STD


def rmbg_postprocess(prediction: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """A ``1 x 1 x h x w`` map → float32 ``H x W`` in [0, 1] (``image_size`` is PIL's (W, H)).

    Bilinear resize, then min-max normalisation; a constant map (no contrast at all) becomes
    all zeros rather than a division by zero.
    """
    width, height = image_size
    resized = F.interpolate(
        prediction.detach().float().reshape(1, 1, *prediction.shape[-2:]),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    low, high = resized.min(), resized.max()
    if float(high - low) <= 1e-12:
        return np.zeros((height, width), dtype=np.float32)
    return ((resized - low) / (high - low)).cpu().numpy().astype(np.float32)


def first_output_map(outputs) -> torch.Tensor:
    """The finest side output of BriaRMBG's ``forward`` (a list of sigmoid maps, first = finest)."""
    while isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    return outputs


def load_rmbg_model(model_id: str, allow_remote_code: bool, device: str = "cpu"):
    """RMBG's ``AutoModelForImageSegmentation`` (hub id or local folder), only with the opt-in."""
    if not allow_remote_code:
        raise ModelUnavailableError(
            f"mask.backend = rmbg loads {model_id!r}, whose model code comes from its hub "
            "repository and runs on load. Opt in with mask.trust_remote_code: true in the "
            "catalog (read the repository's code first), or use mask.backend: saliency or "
            "grounded_sam"
        )
    from transformers import AutoModelForImageSegmentation

    try:
        with LOADING_LOCK:
            model = AutoModelForImageSegmentation.from_pretrained(
                resolve_model_source(model_id), trust_remote_code=allow_remote_code
            )
    except (OSError, ValueError, ImportError) as error:
        raise ModelUnavailableError(
            f"mask.rmbg_model = {model_id!r} could not be loaded: {error}. Without network it must "
            "be in the local hub cache (huggingface-cli download briaai/RMBG-1.4 on a connected "
            "machine) or be a local folder; or use mask.backend: saliency"
        ) from error
    return model.eval().to(device)


class RmbgMaskBackend(MaskBackend):
    """BRIA RMBG-1.4: a soft foreground matte from the salient-object model."""

    name = "rmbg"

    def __init__(self, model: torch.nn.Module, model_id: str, device: str = "cpu"):
        self.model = model
        self.model_id = model_id
        self.device = device

    @classmethod
    def from_config(cls, config, device: str = "cpu") -> "RmbgMaskBackend":
        """Load ``config.rmbg_model``; refuses unless ``config.trust_remote_code`` is set."""
        model = load_rmbg_model(config.rmbg_model, config.trust_remote_code, device)
        return cls(model, config.rmbg_model, device)

    @torch.no_grad()
    def predict(self, image: Image.Image, class_word: str = "") -> np.ndarray:
        """Soft float32 mask in [0, 1] at the image's size."""
        pixels = rmbg_preprocess(as_rgb_array(image)).to(self.device)
        prediction = first_output_map(self.model(pixels))
        return check_mask(rmbg_postprocess(prediction, image.size), image)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "rmbg_model": self.model_id,
            "rmbg_fingerprint": model_fingerprint(self.model_id),
            "input_size": list(RMBG_INPUT_SIZE),
        }
