"""Evaluators of the toy world: small CNNs trained on the generator's ground truth.

This module holds what the runtime needs (the networks, loading, inference and the metrics built
on them); ``recipes.toy.evaluators`` trains them.

- ``ToyRecogniser``: which (shape, colour) pairs and which shapes are in an image, and how many
  objects (0-3). Its ``embed_images`` / ``embed_texts`` give normalised multi-hot vectors in one
  space, the toy analogue of CLIP: the cosine between an image and a prompt is prompt alignment.
- ``ToyIdentityEncoder``: an instance embedding trained contrastively (InfoNCE) so that two
  views of one object instance (different position, size, background, distractors) are close
  and different instances, even of the same shape or colours, are apart; the toy analogue of
  DINO, with the same ``embed_images`` interface.

Each is saved as ``config.json`` + ``model.safetensors`` (``CONFIG_FILE``, ``WEIGHTS_FILE``)
in its own folder.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conceptflow.toy.world import COLOURS, SHAPES

COLOUR_NAMES = tuple(COLOURS)
PAIRS = tuple((shape, colour) for shape in SHAPES for colour in COLOUR_NAMES)
MAX_OBJECTS = 3
PRESENT = 0.5  # probability above which a recognised label counts as present
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def evaluator_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> the evaluators' input: (N, 3, 64, 64) in [-1, 1]."""
    arrays = np.stack([np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR), np.float32)
                       for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


class ConvTrunk(nn.Module):
    """64 px RGB -> a flat feature vector that keeps coarse layout (4x4 cells); strided from the
    first layer because shapes and colours, not 2-pixel stripes, are what it has to read."""

    def __init__(self, width: int = 32, features: int = 256):
        super().__init__()
        layers, channels = [], 3
        for out_channels, stride in ((width, 2), (2 * width, 2), (4 * width, 2), (4 * width, 2)):
            layers += [nn.Conv2d(channels, out_channels, 3, stride, 1), nn.GroupNorm(8, out_channels), nn.SiLU()]
            channels = out_channels
        self.convs = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, features), nn.SiLU())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.project(self.convs(pixels))


class RecogniserNet(nn.Module):
    def __init__(self, width: int = 32, features: int = 256):
        super().__init__()
        self.trunk = ConvTrunk(width, features)
        self.pairs = nn.Linear(features, len(PAIRS))
        self.shapes = nn.Linear(features, len(SHAPES))
        self.colours = nn.Linear(features, len(COLOUR_NAMES))
        self.count = nn.Linear(features, MAX_OBJECTS + 1)

    def forward(self, pixels):
        features = self.trunk(pixels)
        return self.pairs(features), self.shapes(features), self.colours(features), self.count(features)


class IdentityNet(nn.Module):
    def __init__(self, width: int = 32, features: int = 256, dim: int = 64):
        super().__init__()
        self.trunk = ConvTrunk(width, features)
        self.head = nn.Linear(features, dim)

    def forward(self, pixels):
        return F.normalize(self.head(self.trunk(pixels)), dim=-1)


# --- prompts --------------------------------------------------------------------------------

def prompt_pairs(prompt: str) -> list[tuple[str, str | None]]:
    """(shape, colour) for every shape word in ``prompt``; colour is the nearest colour word in
    the three words before it (size and pattern words may sit between), or None. Concept
    references such as ``<zigzag_star>`` are not words of the prompt."""
    words = re.findall(r"[a-z]+", re.sub(r"<[^>]*>", " ", prompt.lower()))
    pairs = []
    for index, word in enumerate(words):
        if word in SHAPES:
            colour = next((w for w in reversed(words[max(0, index - 3):index]) if w in COLOURS), None)
            pairs.append((word, colour))
    return pairs


# --- the evaluators -------------------------------------------------------------------------

class SavedEvaluator(ABC):
    """An evaluator network loaded from its folder (``CONFIG_FILE`` + ``WEIGHTS_FILE``), in eval
    mode on ``device``; ``config`` is its saved config and ``model_id`` the folder."""

    @staticmethod
    @abstractmethod
    def build_net(config: dict) -> nn.Module:
        """The untrained network of the sizes ``config`` records."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from safetensors.torch import load_file

        folder = Path(folder)
        self.config = json.loads((folder / CONFIG_FILE).read_text())
        self.model_id = str(folder)
        self.device = device
        self.net = self.build_net(self.config)
        self.net.load_state_dict(load_file(folder / WEIGHTS_FILE))
        self.net = self.net.eval().to(device)


@dataclass
class Recognition:
    pairs: torch.Tensor  # (N, len(PAIRS)) probabilities
    shapes: torch.Tensor  # (N, len(SHAPES)) probabilities
    counts: torch.Tensor  # (N,) most likely object count
    colours: torch.Tensor | None = None  # (N, len(COLOUR_NAMES)) probabilities

    def has_colour(self, index: int, colour: str) -> bool:
        return bool(self.colours[index, COLOUR_NAMES.index(colour)] > PRESENT)

    def has(self, index: int, shape: str, colour: str | None = None) -> bool:
        if colour is None:
            return bool(self.shapes[index, SHAPES.index(shape)] > PRESENT)
        return bool(self.pairs[index, PAIRS.index((shape, colour))] > PRESENT)


class ToyRecogniser(SavedEvaluator):
    """Which shapes and colours are in an image, and how many objects."""

    @staticmethod
    def build_net(config: dict) -> nn.Module:
        return RecogniserNet(config["width"], config["features"])

    @torch.no_grad()
    def recognise(self, images: Sequence[Image.Image]) -> Recognition:
        pairs, shapes, colours, counts = self.net(evaluator_pixels(images).to(self.device))
        return Recognition(torch.sigmoid(pairs).cpu(), torch.sigmoid(shapes).cpu(), counts.argmax(-1).cpu(),
                           torch.sigmoid(colours).cpu())

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 64) normalised (shape, colour) presence probabilities (the toy CLIP image side)."""
        return F.normalize(self.recognise(images).pairs, dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, 64) normalised multi-hot of the (shape, colour) pairs a prompt asks for; a shape
        without a colour spreads over that shape's colours."""
        rows = torch.zeros(len(texts), len(PAIRS))
        for row, text in enumerate(texts):
            for shape, colour in prompt_pairs(text):
                colours = [colour] if colour else list(COLOUR_NAMES)
                for name in colours:
                    rows[row, PAIRS.index((shape, name))] = 1.0 / len(colours)
        return F.normalize(rows, dim=-1)


class ToyIdentityEncoder(SavedEvaluator):
    """Same object instance or not: cosine of normalised instance embeddings."""

    @staticmethod
    def build_net(config: dict) -> nn.Module:
        return IdentityNet(config["width"], config["features"], config["dim"])

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.net(evaluator_pixels(images).to(self.device)).cpu()


# --- metrics --------------------------------------------------------------------------------

def prompt_alignment(recogniser: ToyRecogniser, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """Fraction of asked-for objects seen: per image, each (shape, colour) of its prompt counts
    as seen when the recogniser finds that pair (or that shape, when no colour is asked)."""
    recognition = recogniser.recognise(images)
    asked = seen = 0
    for index, prompt in enumerate(prompts):
        for shape, colour in prompt_pairs(prompt):
            asked += 1
            seen += recognition.has(index, shape, colour)
    return seen / asked if asked else float("nan")


def attribute_recall(recogniser: ToyRecogniser, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
    """Shapes and colours asked for and seen, each on its own (unbound): how far a base that
    does not yet bind them gets."""
    recognition = recogniser.recognise(images)
    asked = shapes = colours = 0
    for index, prompt in enumerate(prompts):
        for shape, colour in prompt_pairs(prompt):
            asked += 1
            shapes += recognition.has(index, shape)
            colours += colour is not None and recognition.has_colour(index, colour)
    return {"shape": shapes / asked if asked else float("nan"), "colour": colours / asked if asked else float("nan")}


def identity_similarity(encoder: ToyIdentityEncoder, generated: Sequence[Image.Image],
                        references: Sequence[Image.Image]) -> float:
    """Mean cosine between each generated image and each reference view of the instance."""
    return float((encoder.embed_images(generated) @ encoder.embed_images(references).T).mean())


def object_counts(recogniser: ToyRecogniser, images: Sequence[Image.Image]) -> list[int]:
    return [int(c) for c in recogniser.recognise(images).counts]


def omission_redundancy(recogniser: ToyRecogniser, images: Sequence[Image.Image],
                        class_words: Sequence[Sequence[str]]) -> dict[str, float]:
    """Toy omission / redundancy rates of multi-concept images.

    Image i asks for one object per class word in ``class_words[i]``. A concept is omitted when
    its class shape is not recognised or the image holds fewer objects than asked (one
    concept missing); an image is redundant when it holds more objects than asked.
    """
    recognition = recogniser.recognise(images)
    concepts = omitted = redundant = 0
    for index, classes in enumerate(class_words):
        count = int(recognition.counts[index])
        missing_shapes = sum(not recognition.has(index, shape) for shape in set(classes) if shape in SHAPES)
        concepts += len(classes)
        omitted += max(missing_shapes, len(classes) - count, 0)
        redundant += count > len(classes)
    return {"omission_rate": omitted / concepts if concepts else float("nan"),
            "redundancy_rate": redundant / len(class_words) if class_words else float("nan")}


def toy_metric_encoders(folder: str | Path, device: str = "cpu"):
    """``MetricEncoders`` for ``conceptflow.metrics.evaluate.evaluate_images`` with the toy
    evaluators in CLIP's and DINO's places: CLIP-T becomes prompt alignment over (shape, colour)
    pairs, CLIP-I / DINO become instance identity. ``folder`` holds ``recogniser/`` and ``identity/``."""
    from conceptflow.metrics.encoders import PerceptualDistance
    from conceptflow.metrics.evaluate import MetricEncoders

    folder = Path(folder)
    return MetricEncoders(clip=ToyRecogniser(folder / "recogniser", device),
                          dino=ToyIdentityEncoder(folder / "identity", device), lpips=PerceptualDistance(device))
