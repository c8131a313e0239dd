"""Toy concepts: object instances the world's vocabulary cannot describe, and their catalog.

A concept is a fixed ``Look`` (a two- or three-tone fill such as a zig-zag, or a composite such
as a ring around a cross) with a class word the vocabulary knows ("star"). Several concepts
share a class, so a personalised model must tell similar instances apart. ``write_toy_catalog``
renders each concept at varied positions, sizes and backgrounds into the folder layout and
mapping-form ``catalog.yaml`` the pipeline ingests like any photo catalog.
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
    MIN_CONTRAST,
    SHAPES,
    Background,
    Look,
    RenderedScene,
    Scene,
    SceneObject,
    render,
)

CONCEPT_RADIUS = (9.0, 13.0)


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


def render_concept_images(concept: ToyConcept, count: int = 5, seed: int = 0) -> list[RenderedScene]:
    """``count`` views of one instance: same look, varied position, size and background."""
    rng = np.random.default_rng([seed, *concept.name.encode()])
    return [render(place_look(concept.look, concept.class_word, rng, concept.name), f"a {concept.class_word}")
            for _ in range(count)]


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


def write_concept_images(folder: str | Path, name: str, count: int = 5, seed: int = 0) -> list[Path]:
    """Render ``count`` views of toy concept ``name`` as ``folder/NN.png`` (the default catalog's
    ``assets/toy-concepts/<name>`` were written by this with the defaults)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, view in enumerate(render_concept_images(TOY_CONCEPTS[name], count, seed)):
        paths.append(folder / f"{index:02d}.png")
        view.image.save(paths[-1])
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
            "train": {"method": "edlora", "steps": train_steps, "checkpoint_every": max(1, train_steps // 3)},
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
    }
    path = folder / "catalog.yaml"
    path.write_text("# Toy-world concepts written by conceptflow.toy.concepts.write_toy_catalog\n"
                    + yaml.safe_dump(catalog, sort_keys=False))
    return path
