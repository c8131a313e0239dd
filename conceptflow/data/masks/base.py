"""The mask backend interface: one foreground mask per concept image.

Every backend turns an RGB image and the concept's class word ("dog", "backpack") into a
float32 ``H x W`` array in [0, 1] at the image's own size. Training uses it to restrict the
denoising loss and the attention regularisation to the subject; lineage records
``describe()`` so a mask can be traced to the model and checkpoint that made it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from PIL import Image

from conceptflow.fileio import file_md5  # noqa: F401  (backends record checkpoint md5s with it)


class MaskBackend(ABC):
    """A foreground segmenter: ``predict(image, class_word) -> float32 H x W mask in [0, 1]``."""

    name: str

    @abstractmethod
    def predict(self, image: Image.Image, class_word: str) -> np.ndarray:
        """The foreground mask of ``image`` (RGB) for the subject named ``class_word``."""

    @abstractmethod
    def describe(self) -> dict:
        """Backend name and the model ids / checkpoint hashes it uses (for lineage)."""


def as_rgb_array(image: Image.Image) -> np.ndarray:
    """``image`` as a uint8 ``H x W x 3`` array (any PIL mode is converted to RGB)."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def check_mask(mask: np.ndarray, image: Image.Image) -> np.ndarray:
    """``mask`` as float32 in [0, 1] with the image's ``H x W``; raises if a backend broke that."""
    width, height = image.size
    if mask.shape != (height, width):
        raise ValueError(f"mask shape {mask.shape} does not match image size {(height, width)}")
    return np.clip(mask.astype(np.float32), 0.0, 1.0)

