"""Mask backends: the weight-free saliency backend, GroundingDINO→SAM on tiny random models
saved as checkpoint files, RMBG pre/post-processing and its opt-in, and backend selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptflow.data.masks.saliency import SaliencyMaskBackend, centred_ellipse

DREAMBOOTH_DIR = Path("/work/shared/data/dreambooth")


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    predicted = mask > 0.5
    return float((predicted & truth).sum() / (predicted | truth).sum())


def synthetic_scene(background: str, touches_bottom: bool = False, seed: int = 0):
    """A striped red 'animal' (ellipse body + ear) on a plain, gradient or noisy background."""
    rng = np.random.default_rng(seed)
    height, width = 160, 200
    rows, cols = np.mgrid[0:height, 0:width]
    if background == "plain":
        pixels = np.ones((height, width, 3)) * [200, 210, 220]
    elif background == "gradient":
        top_weight = (rows / height)[..., None]
        pixels = (1 - top_weight) * [230, 200, 150] + top_weight * [90, 120, 170]
    else:
        pixels = np.ones((height, width, 3)) * [120, 140, 110] + rng.normal(0, 12, (height, width, 3))
    centre_row = 0.75 if touches_bottom else 0.55
    truth = ((cols - 0.52 * width) / (0.22 * width)) ** 2 + (
        (rows - centre_row * height) / (0.3 * height)
    ) ** 2 <= 1
    truth |= (abs(cols - 0.45 * width) < 0.05 * width) & (rows > (centre_row - 0.4) * height) & (
        rows < (centre_row - 0.15) * height
    )
    subject = np.ones((height, width, 3)) * [180, 40, 50]
    subject[..., 1] += (cols % 20 < 10) * 60
    pixels = np.where(truth[..., None], subject, pixels)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), truth


# --- saliency (no weights) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "background, touches_bottom",
    [("plain", False), ("gradient", False), ("noisy", False), ("plain", True), ("gradient", True)],
)
def test_saliency_recovers_synthetic_subject(background, touches_bottom):
    image, truth = synthetic_scene(background, touches_bottom)
    mask = SaliencyMaskBackend().predict(image, "animal")
    assert mask.dtype == np.float32 and mask.shape == truth.shape
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert iou(mask, truth) > 0.9


def test_saliency_without_grabcut_still_finds_plain_subject():
    image, truth = synthetic_scene("plain")
    assert iou(SaliencyMaskBackend(use_grabcut=False).predict(image, "animal"), truth) > 0.85


def test_saliency_is_deterministic_and_size_preserving():
    image, _ = synthetic_scene("noisy", seed=3)
    image = image.resize((333, 211))
    backend = SaliencyMaskBackend(working_size=128)
    first, second = backend.predict(image, "x"), backend.predict(image, "x")
    assert first.shape == (211, 333)
    np.testing.assert_array_equal(first, second)


def test_saliency_falls_back_to_centred_ellipse_on_featureless_image():
    image = Image.new("RGB", (120, 90), (128, 128, 128))
    mask = SaliencyMaskBackend().predict(image, "thing")
    expected = centred_ellipse(90, 120)
    assert iou(mask, expected) > 0.97
    assert mask[45, 60] == 1.0 and mask[0, 0] == 0.0


def test_saliency_accepts_non_rgb_modes():
    image, truth = synthetic_scene("plain")
    mask = SaliencyMaskBackend().predict(image.convert("RGBA"), "animal")
    assert iou(mask, truth) > 0.9


@pytest.mark.skipif(
    not DREAMBOOTH_DIR.is_dir(), reason=f"DreamBooth photos not found at {DREAMBOOTH_DIR}"
)
@pytest.mark.parametrize("subject", ["backpack", "can", "dog6", "duck_toy", "teapot", "robot_toy"])
def test_saliency_on_real_dreambooth_photos(subject):
    photo = DREAMBOOTH_DIR / subject / "00.jpg"
    if not photo.exists():
        pytest.skip(f"{photo} is missing")
    image = Image.open(photo).convert("RGB")
    image.thumbnail((512, 512))
    mask = SaliencyMaskBackend().predict(image, subject)
    area = float(mask.mean())
    assert 0.01 < area < 0.9
    # the saliency path found the subject itself, not the degenerate-case ellipse
    assert iou(mask, centred_ellipse(*mask.shape)) < 0.9
