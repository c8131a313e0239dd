"""Evaluators of the toy world: small CNNs trained on the generator's ground truth.

- ``ToyRecogniser``: which (shape, colour) pairs and which shapes are in an image, and how many
  objects (0-3). Its ``embed_images`` / ``embed_texts`` give normalised multi-hot vectors in one
  space, the toy analogue of CLIP: the cosine between an image and a prompt is prompt alignment.
- ``ToyIdentityEncoder``: an instance embedding trained contrastively (InfoNCE) so that two
  views of one object instance (different position, size, background, distractors) are close
  and different instances, even of the same shape or colours, are apart; the toy analogue of
  DINO, with the same ``embed_images`` interface.

Each is saved as ``config.json`` + ``model.safetensors`` in its own folder.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from conceptflow.toy.concepts import place_look, random_look, with_unnamed_instances
from conceptflow.toy.world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    Look,
    Scene,
    SceneObject,
    render,
    sample_scene,
)

COLOUR_NAMES = tuple(COLOURS)
PAIRS = tuple((shape, colour) for shape in SHAPES for colour in COLOUR_NAMES)
MAX_OBJECTS = 3
PRESENT = 0.5  # probability above which a recognised label counts as present


def _pixels(images: Sequence[Image.Image]) -> torch.Tensor:
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

def _save(net: nn.Module, folder: Path, config: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # float16 on disk keeps the committed toy assets small; loading casts back to the net's float32
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _load_state(net: nn.Module, folder: Path) -> nn.Module:
    from safetensors.torch import load_file

    net.load_state_dict(load_file(folder / "model.safetensors"))
    return net.eval()


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


class ToyRecogniser:
    """Which shapes and colours are in an image, and how many objects."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder)
        self.config = json.loads((folder / "config.json").read_text())
        self.model_id = str(folder)
        self.device = device
        self.net = _load_state(RecogniserNet(self.config["width"], self.config["features"]), folder).to(device)

    @torch.no_grad()
    def recognise(self, images: Sequence[Image.Image]) -> Recognition:
        pairs, shapes, colours, counts = self.net(_pixels(images).to(self.device))
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


class ToyIdentityEncoder:
    """Same object instance or not: cosine of normalised instance embeddings."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder)
        self.config = json.loads((folder / "config.json").read_text())
        self.model_id = str(folder)
        self.device = device
        self.net = _load_state(IdentityNet(self.config["width"], self.config["features"], self.config["dim"]),
                               folder).to(device)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.net(_pixels(images).to(self.device)).cpu()


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


# --- training data --------------------------------------------------------------------------

def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur and noise, so the evaluators also read the softer images a tiny diffusion model draws."""
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(0, 8), (64, 64, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def recogniser_batch(rng: np.random.Generator, batch_size: int):
    """(pixels, pair targets, colour-label mask, shape targets, colour targets, counts) from fresh
    scenes; scenes with unnamed instances have no pair or colour labels (mask 0)."""
    images, pairs, pair_mask, shapes, colours, counts = [], [], [], [], [], []
    for _ in range(batch_size):
        draw = rng.random()
        if draw < 0.05:
            scene = Scene(sample_scene(rng).background, ())
        elif draw < 0.35:
            scene = with_unnamed_instances(sample_scene(rng), rng, 0.5)  # mixed with vocabulary objects
        else:
            scene = sample_scene(rng)
        images.append(augment(render(scene).image, rng))
        pair_row, shape_row, colour_row = torch.zeros(len(PAIRS)), torch.zeros(len(SHAPES)), torch.zeros(len(COLOURS))
        exotic = any(o.colour is None for o in scene.objects)
        for obj in scene.objects:
            shape_row[SHAPES.index(obj.shape)] = 1
            if obj.colour is not None:
                pair_row[PAIRS.index((obj.shape, obj.colour))] = 1
                colour_row[COLOUR_NAMES.index(obj.colour)] = 1
        pairs.append(pair_row)
        colours.append(colour_row)
        pair_mask.append(0.0 if exotic else 1.0)
        shapes.append(shape_row)
        counts.append(len(scene.objects))
    return (_pixels(images), torch.stack(pairs), torch.tensor(pair_mask), torch.stack(shapes), torch.stack(colours),
            torch.tensor(counts))


def _variant(look: Look, rng: np.random.Generator) -> Look:
    """A hard negative: ``look`` with one thing changed (colours, fill or shape)."""
    other = random_look(rng)
    change = rng.integers(0, 3)
    if change == 0:
        return Look(look.parts, look.fill, other.colours)
    if change == 1:
        fill = next(f for f in rng.permutation(["zigzag", "split", "quarters", "concentric", "eye", "bands",
                                                 "rim", "tricolour"]) if f != look.fill)
        return Look(look.parts, str(fill), look.colours)
    shape = next(s for s in rng.permutation(SHAPES) if s != look.parts[0][0])
    return Look(((str(shape), 1.0),) + look.parts[1:], look.fill, look.colours)


def _view(look: Look, rng: np.random.Generator) -> Image.Image:
    """One view of an instance: random placement and background, sometimes a distractor."""
    scene = place_look(look, look.parts[0][0], rng)
    if rng.random() < 0.3:
        distractor = sample_scene(rng, object_count=1).objects[0]
        obj = scene.objects[0]
        # the distractor takes the horizontal side away from the instance
        x = POSITIONS["left"] if obj.center[0] > 32 else POSITIONS["right"]
        distractor = SceneObject(distractor.look, (x, distractor.center[1]), distractor.radius, distractor.shape)
        scene = Scene(scene.background, (distractor, obj))
    return augment(render(scene).image, rng)


def identity_batch(rng: np.random.Generator, instances: int):
    """(views_a, views_b): two views of each of ``instances`` looks; half the looks are hard
    negatives of the other half."""
    looks = [random_look(rng) for _ in range(instances // 2)]
    looks += [_variant(look, rng) for look in looks]
    return _pixels([_view(look, rng) for look in looks]), _pixels([_view(look, rng) for look in looks])


# --- training -------------------------------------------------------------------------------

def _train(net: nn.Module, loss_fn, steps: int, lr: float, progress: bool, description: str,
           minutes: float | None = None) -> list[float]:
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    deadline = time.monotonic() + minutes * 60 if minutes else float("inf")
    losses = []
    net.train()
    for step in tqdm(range(steps), desc=description, disable=not progress, mininterval=5.0):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if time.monotonic() > deadline:
            break
    net.eval()
    return losses


def train_recogniser(folder: str | Path, steps: int = 3000, batch_size: int = 48, seed: int = 0, lr: float = 2e-3,
                     width: int = 32, progress: bool = True, minutes: float | None = None) -> list[float]:
    """Train the recogniser on fresh generator scenes; saves into ``folder``; returns losses."""
    torch.manual_seed(seed)
    net = RecogniserNet(width)

    def multi_label(logits, targets, mask=None):
        # summed over labels: a mean over 64 mostly-absent pairs starves the few present ones
        per_image = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
        if mask is None:
            return per_image.mean()
        return (per_image * mask).sum() / mask.sum().clamp(min=1)

    def loss_fn(step: int) -> torch.Tensor:
        pixels, pairs, label_mask, shapes, colours, counts = recogniser_batch(
            np.random.default_rng([seed, 10, step]), batch_size)
        pair_logits, shape_logits, colour_logits, count_logits = net(pixels)
        return (multi_label(pair_logits, pairs, label_mask) + multi_label(colour_logits, colours, label_mask)
                + multi_label(shape_logits, shapes) + F.cross_entropy(count_logits, counts))

    losses = _train(net, loss_fn, steps, lr, progress, "toy recogniser", minutes)
    _save(net, Path(folder), {"kind": "toy-recogniser", "width": width, "features": 256, "shapes": SHAPES,
                              "colours": COLOUR_NAMES, "steps": len(losses), "batch_size": batch_size, "seed": seed,
                              "final_loss": float(np.mean(losses[-20:]))})
    return losses


def train_identity_encoder(folder: str | Path, steps: int = 2000, instances: int = 32, seed: int = 0,
                           lr: float = 2e-3, temperature: float = 0.1, width: int = 32, dim: int = 64,
                           progress: bool = True, minutes: float | None = None) -> list[float]:
    """Train the identity encoder with symmetric InfoNCE over two views per instance."""
    torch.manual_seed(seed)
    net = IdentityNet(width, dim=dim)

    def loss_fn(step: int) -> torch.Tensor:
        views_a, views_b = identity_batch(np.random.default_rng([seed, 20, step]), instances)
        logits = net(views_a) @ net(views_b).T / temperature
        targets = torch.arange(logits.shape[0])
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))

    losses = _train(net, loss_fn, steps, lr, progress, "toy identity encoder", minutes)
    _save(net, Path(folder), {"kind": "toy-identity", "width": width, "features": 256, "dim": dim,
                              "steps": len(losses), "instances": instances, "seed": seed,
                              "temperature": temperature, "final_loss": float(np.mean(losses[-20:]))})
    return losses


def toy_metric_encoders(folder: str | Path, device: str = "cpu"):
    """``MetricEncoders`` for ``conceptflow.metrics.evaluate.evaluate_images`` with the toy
    evaluators in CLIP's and DINO's places: CLIP-T becomes prompt alignment over (shape, colour)
    pairs, CLIP-I / DINO become instance identity. ``folder`` holds ``recogniser/`` and ``identity/``."""
    from conceptflow.metrics.encoders import PerceptualDistance
    from conceptflow.metrics.evaluate import MetricEncoders

    folder = Path(folder)
    return MetricEncoders(clip=ToyRecogniser(folder / "recogniser", device),
                          dino=ToyIdentityEncoder(folder / "identity", device), lpips=PerceptualDistance(device))
