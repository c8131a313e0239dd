"""Toy concepts: object instances the world's vocabulary cannot describe, and their catalog.

A concept is a fixed ``Look`` (a two- or three-tone fill such as a zig-zag, or a composite such
as a ring around a cross) with a class word the vocabulary knows ("star"). Several concepts
share a class, so a personalised model must tell similar instances apart. ``write_toy_catalog``
renders each concept at the world's positions and sizes on varied backgrounds, each image with
a caption in the base's own words ("a big <zigzag_star> on the left, on a sand background"),
into the folder layout and mapping-form ``catalog.yaml`` the pipeline ingests like any photo
catalog.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from conceptflow.toy.world import (
    BACKGROUNDS,
    CONCEPT_FILLS,
    IMAGE_SIZE,
    JITTER_X,
    JITTER_Y,
    MIN_CONTRAST,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    Background,
    Look,
    RenderedScene,
    Scene,
    SceneObject,
    render,
)

CONCEPT_RADIUS = (9.0, 13.0)
# Concept-token learning rate on the toy base: 10x Mix-of-Show's 1e-3. With 1e-3, 100 ED-LoRA steps
# raised <zigzag_star>'s identity by 0.17 over the base's "a star"; with 1e-2 by 0.51 (one seed each).
TOY_EMBEDDING_LR = 1e-2
# ConceptFlow-M's layout-guidance step size on the toy base: the paper's 10 (for SD's 64x64 latents)
# pushed objects out of the 16x16 latents. Omission on 2 prompts x 4 seeds, plain fused 0.25:
# step 10 -> 0.50, 5 -> 0.375, 3 -> 0.25, 2 -> 0.1875, 1 -> 0.1875.
TOY_LAYOUT_STEP_SIZE = 2.0


@dataclass(frozen=True)
class ToyConcept:
    name: str
    class_word: str
    look: Look


def _concept(name: str, class_word: str, fill: str, colours, parts=None) -> ToyConcept:
    return ToyConcept(name, class_word, Look(parts=tuple(parts or ((class_word, 1.0),)), fill=fill,
                                             colours=tuple(colours)))


# Several instances per class word, so similar concepts exist (three stars, two hearts, ...).
TOY_CONCEPTS: dict[str, ToyConcept] = {c.name: c for c in (
    _concept("zigzag_star", "star", "zigzag", [(245, 200, 20), (120, 30, 170)]),
    _concept("split_star", "star", "split", [(215, 35, 35), (30, 90, 215)]),
    _concept("target_star", "star", "concentric", [(245, 130, 20), (20, 130, 70)]),
    _concept("quartered_heart", "heart", "quarters", [(245, 110, 175), (40, 160, 60)]),
    _concept("eye_heart", "heart", "eye", [(30, 30, 30), (240, 220, 40)]),
    _concept("target_circle", "circle", "concentric", [(200, 30, 40), (250, 250, 250)]),
    _concept("flag_circle", "circle", "tricolour", [(30, 60, 200), (245, 245, 245), (215, 35, 35)]),
    _concept("cross_emblem", "ring", "rim", [(30, 80, 200), (245, 140, 20)],
             parts=(("ring", 1.0), ("cross", 0.45))),
)}

# The default multi-concept combinations: concepts of different classes.
TOY_COMBINATIONS: dict[str, tuple[str, str]] = {
    "zigzag_star+quartered_heart": ("zigzag_star", "quartered_heart"),
    "split_star+target_circle": ("split_star", "target_circle"),
}


def _readable_background(look: Look, rng: np.random.Generator) -> Background:
    """A background on which at least one of the look's colours stands out."""
    names = [name for name in BACKGROUNDS
             if max(np.linalg.norm(np.subtract(c, BACKGROUNDS[name], dtype=np.float32)) for c in look.colours)
             >= MIN_CONTRAST]
    return Background(name=str(rng.choice(names)), gradient=bool(rng.random() < 0.4))


def place_look(look: Look, shape: str, rng: np.random.Generator, concept: str | None = None,
               radius_range: tuple[float, float] = CONCEPT_RADIUS) -> Scene:
    """``look`` alone at a random position and size on a random readable background."""
    radius = float(rng.uniform(*radius_range))
    margin = radius + 2.0
    center = (float(rng.uniform(margin, IMAGE_SIZE - margin)), float(rng.uniform(margin, IMAGE_SIZE - margin)))
    obj = SceneObject(look=look, center=center, radius=radius, shape=shape, concept=concept)
    return Scene(background=_readable_background(look, rng), objects=(obj,))


def concept_view(concept: ToyConcept, size: str, slot: str, rng: np.random.Generator) -> RenderedScene:
    """One view of ``concept`` where the world puts a ``size`` object at ``slot``, on a random
    readable background, captioned as the base's captions are with ``<name>`` for the object:
    "a big <zigzag_star> on the left, on a sand background"."""
    center = (POSITIONS[slot] + float(rng.uniform(-JITTER_X, JITTER_X)),
              32.0 + float(rng.uniform(-JITTER_Y, JITTER_Y)))
    obj = SceneObject(look=concept.look, center=center, radius=float(rng.uniform(*SIZES[size])),
                      shape=concept.class_word, size=size, position=slot, concept=concept.name)
    background = _readable_background(concept.look, rng)
    text = f"a {size} <{concept.name}> {POSITION_PHRASES[slot]}, on {background.phrase}"
    return render(Scene(background=background, objects=(obj,)), text)


def render_concept_images(concept: ToyConcept, count: int = 5, seed: int = 0) -> list[RenderedScene]:
    """``count`` captioned views of one instance: same look; positions, sizes and backgrounds
    vary over the world's slots (each slot and size is used before any repeats)."""
    rng = np.random.default_rng([seed, *concept.name.encode()])
    slots, sizes = list(POSITIONS), list(SIZES)
    slot_offset, size_offset = int(rng.integers(len(slots))), int(rng.integers(len(sizes)))
    return [concept_view(concept, sizes[(i + size_offset) % len(sizes)], slots[(i + slot_offset) % len(slots)], rng)
            for i in range(count)]


def random_look(rng: np.random.Generator) -> Look:
    """A random unnamed instance (for training the identity encoder): any shape, or a shape
    around another, with a concept-style fill in two or three random vivid colours."""
    shape = str(rng.choice(SHAPES))
    parts: tuple[tuple[str, float], ...] = ((shape, 1.0),)
    if rng.random() < 0.15:
        parts += ((str(rng.choice(SHAPES)), float(rng.uniform(0.45, 0.7))),)
    fill = str(rng.choice(CONCEPT_FILLS))
    colours = tuple(tuple(int(c) for c in rng.integers(20, 250, size=3)) for _ in range(3))
    return Look(parts=parts, fill=fill, colours=colours)


def with_unnamed_instances(scene: Scene, rng: np.random.Generator, probability: float) -> Scene:
    """``scene`` with each object, with ``probability``, redrawn as a random unnamed instance of
    its shape (``random_look``) in the same place: the class word then stands for many looks, as
    "a dog" does for a real base, and the VAE learns to carry multi-tone fills."""
    objects = []
    for obj in scene.objects:
        if rng.random() < probability:
            look = random_look(rng)
            obj = SceneObject(look=look, center=obj.center, radius=obj.radius, shape=look.parts[0][0],
                              size=obj.size, position=obj.position)
        objects.append(obj)
    return Scene(scene.background, tuple(objects))


def write_concept_images(folder: str | Path, name: str, count: int = 5, seed: int = 0) -> list[Path]:
    """Render ``count`` views of toy concept ``name`` as ``folder/NN.png`` with their captions
    in ``folder/NN.txt`` (the default catalog's ``assets/toy-concepts/<name>`` were written by
    this with the defaults)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, view in enumerate(render_concept_images(TOY_CONCEPTS[name], count, seed)):
        paths.append(folder / f"{index:02d}.png")
        view.image.save(paths[-1])
        paths[-1].with_suffix(".txt").write_text(view.caption + "\n", encoding="utf-8")
    return paths


def write_toy_catalog(folder: str | Path, concept_names: Sequence[str] | None = None, images_per_concept: int = 5,
                      seed: int = 0, base_model: str = "embedded:tiny-sd", train_steps: int = 60,
                      combinations: dict[str, tuple[str, ...]] | None = None,
                      prompt_seeds: Sequence[int] = (0, 1)) -> Path:
    """Render toy concepts into ``folder/concepts/<name>/NN.png`` and write ``folder/catalog.yaml``.

    The catalog is in the mapping form of the project's default catalog (``concepts:`` and
    ``combinations:`` keyed by name), with paths relative to ``folder``. Returns the YAML path.
    """
    folder = Path(folder)
    names = list(concept_names or TOY_CONCEPTS)
    unknown = set(names) - set(TOY_CONCEPTS)
    if unknown:
        raise ValueError(f"unknown toy concepts {sorted(unknown)}; known: {sorted(TOY_CONCEPTS)}")
    if combinations is None:
        combinations = {key: pair for key, pair in TOY_COMBINATIONS.items() if set(pair) <= set(names)}
    concepts_yaml = {}
    for name in names:
        concept = TOY_CONCEPTS[name]
        write_concept_images(folder / "concepts" / name, name, images_per_concept, seed)
        concepts_yaml[name] = {
            "class_word": concept.class_word,
            "images": f"concepts/{name}",
            "train": {"method": "edlora", "steps": train_steps, "lr_embeddings": TOY_EMBEDDING_LR,
                      "checkpoint_every": max(1, train_steps // 3)},
        }
    combinations_yaml = {
        key: {
            "concepts": list(pair),
            "prompts": [
                " and ".join(f"a <{n}>" for n in pair),
                " and ".join(f"a <{n}> {side}" for n, side in zip(pair, ("on the left", "on the right")))
                + ", on a sand background",
            ],
            "seeds": list(prompt_seeds),
        }
        for key, pair in combinations.items()
    }
    catalog = {
        "project": "conceptflow-toy",
        "base_model": base_model,
        "device": "cpu",
        "dtype": "float32",
        "resolution": IMAGE_SIZE,
        "seed": seed,
        "concepts": concepts_yaml,
        "combinations": combinations_yaml,
        "generate": {"conceptflow_m": {"layout_step_size": TOY_LAYOUT_STEP_SIZE}},
    }
    path = folder / "catalog.yaml"
    path.write_text("# Toy-world concepts written by conceptflow.toy.concepts.write_toy_catalog\n"
                    + yaml.safe_dump(catalog, sort_keys=False))
    return path
