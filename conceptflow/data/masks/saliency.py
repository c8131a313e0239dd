"""A foreground mask that needs no weights: border-contrast saliency refined by GrabCut.

Concept photos show one subject, usually near the centre, against a background that
reaches the image border. So:

1. **Boundary prior.** Each of the four border strips gets a small colour model (k-means in
   CIE Lab). A pixel's distance to a strip's model, divided by the strip's own 90th-percentile
   distance, says how unlike that strip it is. The subject may touch one side (a dog's body
   crossing the bottom edge), so the saliency is the *second smallest* of the four
   distances: a pixel is background when it looks like at least two sides.
2. **Centre prior.** The saliency is weighted by a broad Gaussian around the image centre.
3. **Otsu threshold** of the saliency gives a first foreground.
4. **GrabCut** (OpenCV), started from that foreground as "probably foreground" and the rest
   as "probably background", fits colour GMMs and a graph cut; this recovers the parts of the
   subject that are close to some border colour and drops background texture.
5. **Cleanup**: morphological open/close, keep the connected components at least a fifth the
   size of the largest, fill holes.
6. A mask covering under 0.5 % or over 95 % of the image is degenerate (the subject fills
   the frame, or nothing stands out): a centred ellipse is returned instead and a warning is
   logged.

All the work happens at ``working_size`` pixels on the long side; the mask is resized back.
The result is deterministic (OpenCV's RNG is seeded before k-means and GrabCut).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from conceptflow.data.masks.base import MaskBackend, as_rgb_array, check_mask

logger = logging.getLogger(__name__)

MIN_AREA, MAX_AREA = 0.005, 0.95


def resize_long_side(rgb: np.ndarray, long_side: int) -> np.ndarray:
    """``rgb`` resized (area interpolation) so that its longer side is ``long_side`` pixels."""
    height, width = rgb.shape[:2]
    scale = long_side / max(height, width)
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def border_strips(lab: np.ndarray, fraction: float = 0.05) -> list[np.ndarray]:
    """The top, bottom, left and right border strips of ``lab`` as ``N x 3`` pixel lists."""
    band = max(2, round(fraction * min(lab.shape[:2])))
    strips = (lab[:band], lab[-band:], lab[:, :band], lab[:, -band:])
    return [strip.reshape(-1, 3) for strip in strips]


def colour_model_distance(lab: np.ndarray, samples: np.ndarray, clusters: int = 3) -> np.ndarray:
    """Per-pixel distance to the nearest k-means centre of ``samples``, in units of the samples'
    own 90th-percentile distance (so a textured strip tolerates more variation than a flat one)."""
    cv2.setRNGSeed(0)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    _, _, centres = cv2.kmeans(
        samples.astype(np.float32), clusters, None, criteria, 2, cv2.KMEANS_PP_CENTERS
    )
    pixel_distance = np.linalg.norm(lab[:, :, None, :] - centres[None, None], axis=-1).min(-1)
    sample_distance = np.linalg.norm(samples[:, None, :] - centres[None], axis=-1).min(-1)
    # The +5 (Lab units, about a just-noticeable difference) keeps flat strips from
    # turning sensor noise into saliency.
    return pixel_distance / (np.percentile(sample_distance, 90) + 5.0)


def centre_prior(height: int, width: int) -> np.ndarray:
    """A Gaussian weight around the centre with sigma half the image's height/width."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    dy = (rows - (height - 1) / 2) / (0.5 * height)
    dx = (cols - (width - 1) / 2) / (0.5 * width)
    return np.exp(-(dx**2 + dy**2) / 2)


def boundary_saliency(rgb: np.ndarray) -> np.ndarray:
    """Steps 1-2: the second-smallest of the four border-strip distances, times the centre prior."""
    smoothed = cv2.GaussianBlur(rgb, (0, 0), 1.5)
    lab = cv2.cvtColor(smoothed, cv2.COLOR_RGB2LAB).astype(np.float32)
    distances = np.stack([colour_model_distance(lab, strip) for strip in border_strips(lab)])
    second_smallest = np.sort(distances, axis=0)[1]
    return second_smallest * centre_prior(*lab.shape[:2])


def otsu_foreground(saliency: np.ndarray) -> np.ndarray:
    """Step 3: Otsu's threshold on the saliency (scaled to uint8 by its 99.5th percentile)."""
    scale = max(float(np.percentile(saliency, 99.5)), 1e-6)
    saliency_u8 = np.clip(saliency / scale * 255, 0, 255).astype(np.uint8)
    threshold, _ = cv2.threshold(saliency_u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return saliency_u8 > threshold


def grabcut_refine(rgb: np.ndarray, foreground: np.ndarray, iterations: int = 4) -> np.ndarray:
    """Step 4: GrabCut started from ``foreground`` as probable FG, the rest as probable BG."""
    labels = np.where(foreground, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    cv2.grabCut(
        bgr, labels, None, background_model, foreground_model, iterations, cv2.GC_INIT_WITH_MASK
    )
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def clean_foreground(foreground: np.ndarray, keep_fraction: float = 0.2) -> np.ndarray:
    """Step 5: open/close, keep components >= ``keep_fraction`` of the largest, fill holes."""
    structure = np.ones((3, 3), bool)
    foreground = ndimage.binary_opening(foreground, structure)
    foreground = ndimage.binary_closing(foreground, structure, iterations=2)
    components, count = ndimage.label(foreground)
    if count == 0:
        return foreground
    sizes = ndimage.sum(foreground, components, index=np.arange(1, count + 1))
    kept = np.flatnonzero(sizes >= keep_fraction * sizes.max()) + 1
    return ndimage.binary_fill_holes(np.isin(components, kept))


def centred_ellipse(height: int, width: int, radius: float = 0.4) -> np.ndarray:
    """Step 6 fallback: an ellipse with semi-axes ``radius`` x the height/width, centred."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    dy = (rows + 0.5 - height / 2) / (radius * height)
    dx = (cols + 0.5 - width / 2) / (radius * width)
    return dx**2 + dy**2 <= 1.0


def is_degenerate(foreground: np.ndarray) -> bool:
    """True when the mask is (almost) empty or (almost) the whole image."""
    area = float(foreground.mean())
    return not MIN_AREA <= area <= MAX_AREA


def saliency_foreground(rgb: np.ndarray, use_grabcut: bool = True) -> np.ndarray:
    """Steps 1-6 on a uint8 RGB array; a boolean mask of the same height and width."""
    foreground = clean_foreground(otsu_foreground(boundary_saliency(rgb)))
    if use_grabcut and not is_degenerate(foreground):
        foreground = clean_foreground(grabcut_refine(rgb, foreground))
    if is_degenerate(foreground):
        logger.warning(
            "saliency mask covers %.1f%% of the image; using a centred ellipse instead",
            100 * foreground.mean(),
        )
        foreground = centred_ellipse(*rgb.shape[:2])
    return foreground


class SaliencyMaskBackend(MaskBackend):
    """The weight-free default: boundary/centre-prior saliency, Otsu, GrabCut, cleanup."""

    name = "saliency"

    def __init__(self, working_size: int = 256, use_grabcut: bool = True):
        self.working_size = working_size
        self.use_grabcut = use_grabcut

    def predict(self, image: Image.Image, class_word: str = "") -> np.ndarray:
        """Binary float32 mask at the image's size; ``class_word`` is not used by this backend."""
        rgb = as_rgb_array(image)
        height, width = rgb.shape[:2]
        small_mask = saliency_foreground(resize_long_side(rgb, self.working_size), self.use_grabcut)
        full_mask = cv2.resize(
            small_mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
        )
        return check_mask((full_mask >= 0.5).astype(np.float32), image)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "working_size": self.working_size,
            "use_grabcut": self.use_grabcut,
            "opencv": cv2.__version__,
        }
