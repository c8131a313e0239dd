"""Train the toy world's evaluators on the generator's ground truth.

``train_recogniser`` fits ``RecogniserNet`` (which (shape, colour) pairs and shapes are in a
scene, and how many objects) with multi-label losses on fresh scenes; ``train_identity_encoder``
fits ``IdentityNet`` with symmetric InfoNCE over two views of each object instance, half of the
instances hard negatives of the other half. Every batch is a function of (seed, evaluator,
step). The networks, their loading and inference are ``conceptflow.toy.evaluators``'s; this
module saves them in the format it loads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from conceptflow.toy.concepts import place_look, random_look, with_unnamed_instances
from conceptflow.toy.evaluators import (
    COLOUR_NAMES,
    CONFIG_FILE,
    PAIRS,
    WEIGHTS_FILE,
    IdentityNet,
    RecogniserNet,
    evaluator_pixels,
)
from conceptflow.toy.world import COLOURS, POSITIONS, SHAPES, Look, Scene, SceneObject, render, sample_scene


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
    return (evaluator_pixels(images), torch.stack(pairs), torch.tensor(pair_mask), torch.stack(shapes), torch.stack(colours),
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
    return evaluator_pixels([_view(look, rng) for look in looks]), evaluator_pixels([_view(look, rng) for look in looks])


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
    save_evaluator(net, Path(folder), {"kind": "toy-recogniser", "width": width, "features": 256, "shapes": SHAPES,
                                       "colours": COLOUR_NAMES, "steps": len(losses), "batch_size": batch_size,
                                       "seed": seed, "final_loss": float(np.mean(losses[-20:]))})
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
    save_evaluator(net, Path(folder), {"kind": "toy-identity", "width": width, "features": 256, "dim": dim,
                                       "steps": len(losses), "instances": instances, "seed": seed,
                                       "temperature": temperature, "final_loss": float(np.mean(losses[-20:]))})
    return losses


def save_evaluator(net: nn.Module, folder: Path, config: dict) -> Path:
    """``net``'s weights (float16) and ``config`` in ``folder``, as ``conceptflow.toy.evaluators`` loads them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # float16 on disk keeps the committed toy assets small; loading casts back to the net's float32
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()},
              folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder
