"""Grounded-SAM: a GroundingDINO box for the class word, then a SAM mask inside that box.

Detection uses ``groundingdino-py`` (the IDEA-Research release: the model is built from its
Python config file, e.g. ``GroundingDINO_SwinT_OGC.py``, then ``groundingdino_swint_ogc.pth``
is loaded) with the caption ``"<class word>."`` and the box/text thresholds of the reference
demo (0.35 / 0.25). The highest-scoring box prompts ``segment-anything``'s ``SamPredictor``
(single-mask output, as Grounded-Segment-Anything does for box prompts). When no box scores
above the threshold, the whole image is the box and a warning is logged.

Checkpoints are read with ``torch.load(weights_only=True)`` (tensors only; ``.safetensors``
files also work). The GroundingDINO config names its text encoder (``text_encoder_type``,
``bert-base-uncased`` in the official file); that must be a local folder or be in the local
hub cache.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conceptflow.data.masks.base import MaskBackend, as_rgb_array, check_mask, file_md5
from conceptflow.errors import ModelUnavailableError

logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class BoxDetection:
    """The box that prompted SAM: pixel ``x0, y0, x1, y1``, its score, and whether it is the
    whole-image fallback (no GroundingDINO box scored above ``box_threshold``)."""

    box_xyxy: tuple[float, float, float, float]
    score: float
    phrase: str
    is_fallback: bool


def require_file(path: str | None, field: str, what: str) -> Path:
    """``path`` as a Path, or a ModelUnavailableError naming the ``mask.<field>`` setting."""
    if not path:
        raise ModelUnavailableError(
            f"mask.{field} is not set: the grounded_sam backend needs the {what}. Set it in the "
            "catalog's mask section, or use mask.backend: saliency (needs no weights)"
        )
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise ModelUnavailableError(
            f"mask.{field} = {path!r}: file not found. Download the {what} to that path "
            "(see the GroundingDINO / segment-anything READMEs) or use mask.backend: saliency"
        )
    return resolved


def load_state_dict_file(path: Path, field: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt`` (weights-only unpickling) or ``.safetensors`` checkpoint.

    GroundingDINO's release nests the weights under ``"model"``; such a wrapper is unwrapped.
    ``argparse.Namespace`` (training arguments some releases carry) is the one non-tensor
    object allowed; anything else is refused rather than executed.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling and format errors all mean "cannot use this file"
        raise ModelUnavailableError(
            f"mask.{field} = {str(path)!r} could not be read as a weights-only checkpoint: "
            f"{error}. Use the official release file (or its .safetensors conversion)"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelUnavailableError(f"mask.{field} = {str(path)!r} holds no state dict")
    # checkpoints saved from DistributedDataParallel prefix every key with "module."
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_weights(model: torch.nn.Module, state: dict, path: Path, field: str) -> None:
    """Load ``state`` into ``model``; every model key must be present (extra keys are fine:
    the official GroundingDINO file carries unused ``label_enc.weight`` and BERT's
    ``position_ids``)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatch: the config/model type is not the checkpoint's
        raise ModelUnavailableError(
            f"mask.{field} = {str(path)!r} does not fit the configured architecture: {error}"
        ) from error
    if missing:
        raise ModelUnavailableError(
            f"mask.{field} = {str(path)!r} lacks {len(missing)} weights of the configured model "
            f"(first: {missing[:3]}); check that the config / model type matches the checkpoint"
        )
    if unexpected:
        logger.debug("ignored %d unused checkpoint keys: %s", len(unexpected), unexpected[:5])


FILE_KINDS = {
    "groundingdino_config": "GroundingDINO config (.py)",
    "groundingdino_checkpoint": "GroundingDINO checkpoint (.pth)",
    "sam_checkpoint": "SAM checkpoint (.pth)",
}


def load_groundingdino(config_path: str | None, checkpoint_path: str | None, device: str = "cpu"):
    """GroundingDINO in eval mode: built from its config file, weights from its checkpoint."""
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    config_file = require_file(
        config_path, "groundingdino_config", FILE_KINDS["groundingdino_config"]
    )
    checkpoint_file = require_file(
        checkpoint_path, "groundingdino_checkpoint", FILE_KINDS["groundingdino_checkpoint"]
    )
    args = SLConfig.fromfile(str(config_file))
    args.device = device
    try:
        # the build prints "final text_encoder_type: ..."; keep the CLI's output clean
        with contextlib.redirect_stdout(io.StringIO()):
            model = build_model(args)
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(
            f"GroundingDINO's text encoder {args.text_encoder_type!r} (text_encoder_type in "
            f"{config_file}) could not be loaded: {error}. Put it in the local hub cache or set "
            "text_encoder_type to a local folder"
        ) from error
    state = load_state_dict_file(checkpoint_file, "groundingdino_checkpoint")
    load_weights(model, state, checkpoint_file, "groundingdino_checkpoint")
    return model.eval().to(device)


def load_sam(model_type: str, checkpoint_path: str | None, device: str = "cpu"):
    """A segment-anything ``Sam`` of ``model_type`` (vit_h / vit_l / vit_b) with its checkpoint."""
    from segment_anything import sam_model_registry

    checkpoint_file = require_file(checkpoint_path, "sam_checkpoint", FILE_KINDS["sam_checkpoint"])
    if model_type not in sam_model_registry:
        raise ModelUnavailableError(
            f"mask.sam_model_type = {model_type!r} is not one of {sorted(sam_model_registry)}"
        )
    sam = sam_model_registry[model_type]()  # random init; the checkpoint overwrites every weight
    state = load_state_dict_file(checkpoint_file, "sam_checkpoint")
    load_weights(sam, state, checkpoint_file, "sam_checkpoint")
    return sam.eval().to(device)


def groundingdino_input(image: Image.Image, short_side: int = 800, max_side: int = 1333):
    """The detector's input tensor: resize (short side 800, long side <= 1333, as the reference
    ``load_image``), to tensor, ImageNet normalisation."""
    import groundingdino.datasets.transforms as T

    transform = T.Compose(
        [
            T.RandomResize([short_side], max_size=max_side),  # one size: deterministic
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    tensor, _ = transform(image, None)
    return tensor


def cxcywh_to_xyxy_pixels(box: torch.Tensor, width: int, height: int) -> tuple[float, ...]:
    """A normalised (cx, cy, w, h) box as pixel (x0, y0, x1, y1), clipped to the image."""
    cx, cy, w, h = box.tolist()
    x0, x1 = np.clip([(cx - w / 2) * width, (cx + w / 2) * width], 0, width)
    y0, y1 = np.clip([(cy - h / 2) * height, (cy + h / 2) * height], 0, height)
    return float(x0), float(y0), float(x1), float(y1)


class GroundedSamMaskBackend(MaskBackend):
    """GroundingDINO box for the class word → SAM mask inside it."""

    name = "grounded_sam"

    def __init__(
        self,
        groundingdino_config: str | None,
        groundingdino_checkpoint: str | None,
        sam_checkpoint: str | None,
        sam_model_type: str = "vit_h",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        device: str = "cpu",
        detection_short_side: int = 800,
    ):
        from segment_anything import SamPredictor

        self.paths = {
            "groundingdino_config": groundingdino_config,
            "groundingdino_checkpoint": groundingdino_checkpoint,
            "sam_checkpoint": sam_checkpoint,
        }
        for field, path in self.paths.items():  # fail on a missing file before loading anything
            require_file(path, field, FILE_KINDS[field])
        self.detector = load_groundingdino(groundingdino_config, groundingdino_checkpoint, device)
        self.predictor = SamPredictor(load_sam(sam_model_type, sam_checkpoint, device))
        self.sam_model_type = sam_model_type
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.device = device
        self.detection_short_side = detection_short_side
        self.last_detection: BoxDetection | None = None
        self._description: dict | None = None

    @classmethod
    def from_config(cls, config, device: str = "cpu", **kwargs) -> "GroundedSamMaskBackend":
        """Build from a ``MaskConfig``."""
        return cls(
            config.groundingdino_config,
            config.groundingdino_checkpoint,
            config.sam_checkpoint,
            sam_model_type=config.sam_model_type,
            box_threshold=config.box_threshold,
            text_threshold=config.text_threshold,
            device=device,
            **kwargs,
        )

    def detect(self, image: Image.Image, class_word: str) -> BoxDetection:
        """The best GroundingDINO box for caption ``class_word`` (whole image if none passes)."""
        from groundingdino.util.inference import predict

        rgb_image = image.convert("RGB")
        width, height = rgb_image.size
        boxes, scores, phrases = predict(
            self.detector,
            groundingdino_input(rgb_image, self.detection_short_side),
            caption=class_word,
            box_threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            device=self.device,
        )
        if len(boxes) == 0:
            logger.warning(
                "GroundingDINO found no %r box scoring above %.2f; SAM gets the whole image",
                class_word,
                self.box_threshold,
            )
            return BoxDetection((0.0, 0.0, float(width), float(height)), 0.0, "", True)
        best = int(torch.argmax(scores))
        return BoxDetection(
            cxcywh_to_xyxy_pixels(boxes[best], width, height),
            float(scores[best]),
            phrases[best],
            False,
        )

    def predict(self, image: Image.Image, class_word: str) -> np.ndarray:
        """SAM's single mask for the detected box, as a binary float32 mask."""
        detection = self.detect(image, class_word)
        self.last_detection = detection
        self.predictor.set_image(as_rgb_array(image), image_format="RGB")
        masks, _, _ = self.predictor.predict(
            box=np.asarray(detection.box_xyxy, dtype=np.float32), multimask_output=False
        )
        return check_mask(masks[0].astype(np.float32), image)

    def describe(self) -> dict:
        """Backend settings and the md5 of each file (computed once; SAM vit_h is 2.4 GB)."""
        if self._description is None:
            self._description = {
                "backend": self.name,
                **self.paths,
                **{f"{key}_md5": file_md5(path) for key, path in self.paths.items()},
                "sam_model_type": self.sam_model_type,
                "box_threshold": self.box_threshold,
                "text_threshold": self.text_threshold,
                "detection_short_side": self.detection_short_side,
                "no_box_fallback": "whole-image box",
            }
        return dict(self._description)
