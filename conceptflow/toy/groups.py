"""Toy group photos: two toy concepts in one picture, with each one's ground-truth mask.

The group form of a catalog (Textual Localization) learns several concepts from photos that
show them together. ``write_toy_group_catalog`` renders such photos (one concept in the left
slot, the other in the right, sides and sizes varied, captioned in the base's words: "a big
<zigzag_star> on the left and a small <eye_heart> on the right, on a sand background"), writes
each concept's visible pixels as its mask (``<group>_masks/<concept>/NN.png``, the
``ground_truth`` mask backend's input) and a catalog whose ``groups:`` list them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import yaml
from PIL import Image

from conceptflow.toy.concepts import TOY_CONCEPTS, TOY_EMBEDDING_LR, _readable_background, write_concept_images
from conceptflow.toy.world import (
    IMAGE_SIZE,
    JITTER_X,
    JITTER_Y,
    MIN_CONTRAST,
    POSITION_PHRASES,
    POSITIONS,
    SIZES,
    BACKGROUNDS,
    RenderedScene,
    Scene,
    SceneObject,
    render,
)


def _contrasts(background: str, colours) -> bool:
    return max(np.linalg.norm(np.subtract(c, BACKGROUNDS[background], dtype=np.float32)) for c in colours) >= MIN_CONTRAST


def render_group_images(names: Sequence[str], count: int = 5, seed: int = 0) -> list[RenderedScene]:
    """``count`` captioned photos of two toy concepts side by side; ``masks[i]`` is concept i's."""
    if len(names) != 2:
        raise ValueError(f"a toy group photo shows two concepts, not {len(names)}")
    concepts = [TOY_CONCEPTS[name] for name in names]
    rng = np.random.default_rng([seed, *"+".join(names).encode()])
    scenes = []
    for index in range(count):
        sides = ("left", "right") if index % 2 == 0 else ("right", "left")
        sizes = [str(rng.choice(list(SIZES))) for _ in concepts]
        background = _readable_background(concepts[0].look, rng)
        for _ in range(20):  # one both concepts stand out on
            if _contrasts(background.name, concepts[1].look.colours):
                break
            background = _readable_background(concepts[0].look, rng)
        objects = tuple(
            SceneObject(look=concept.look, center=(POSITIONS[side] + float(rng.uniform(-JITTER_X, JITTER_X)),
                                                   32.0 + float(rng.uniform(-JITTER_Y, JITTER_Y))),
                        radius=float(rng.uniform(*SIZES[size])), shape=concept.class_word, size=size, position=side,
                        concept=concept.name)
            for concept, side, size in zip(concepts, sides, sizes))
        ordered = sorted(zip(objects, names), key=lambda pair: pair[0].center[0])  # captions read left to right
        text = " and ".join(f"a {obj.size} <{name}> {POSITION_PHRASES[obj.position]}" for obj, name in ordered)
        scenes.append(render(Scene(background=background, objects=objects), f"{text}, on {background.phrase}"))
    return scenes


def write_group_photos(folder: str | Path, group: str, names: Sequence[str], count: int = 5,
                       seed: int = 0) -> tuple[Path, Path]:
    """Photos in ``folder/groups/<group>/NN.png`` (+ captions), masks in ``folder/groups/<group>_masks/
    <concept>/NN.png``; returns the two folders (relative to ``folder``)."""
    folder = Path(folder)
    images, masks = Path("groups") / group, Path("groups") / f"{group}_masks"
    (folder / images).mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(render_group_images(names, count, seed)):
        scene.image.save(folder / images / f"{index:02d}.png")
        (folder / images / f"{index:02d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
        for name, mask in zip(names, scene.masks):
            (folder / masks / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(folder / masks / name / f"{index:02d}.png")
    return images, masks


def write_toy_group_catalog(folder: str | Path, groups: Mapping[str, Sequence[str]], photos_per_group: int = 5,
                            seed: int = 0, base_model: str = "embedded:tiny-sd", train_steps: int = 60,
                            train: Mapping | None = None, single_concepts: Sequence[str] = (),
                            combinations: Mapping[str, Sequence[str]] | None = None,
                            prompt_seeds: Sequence[int] = (0, 1)) -> Path:
    """A toy catalog whose ``groups:`` learn pairs of concepts from photos showing both (Textual
    Localization, ground-truth masks), beside ``single_concepts`` learnt alone by ED-LoRA."""
    folder = Path(folder)
    settings = {"method": "textual_localization", "steps": train_steps, "lr_embeddings": TOY_EMBEDDING_LR,
                "lr_kv": 1e-4, "prior_images": 4, "prior_steps": 10, "checkpoint_every": max(1, train_steps // 3),
                **(train or {})}
    concepts_yaml, groups_yaml = {}, {}
    for group, names in groups.items():
        images, masks = write_group_photos(folder, group, names, photos_per_group, seed)
        groups_yaml[group] = {"images": images.as_posix(), "masks": masks.as_posix(), "concepts": list(names),
                              "train": dict(settings)}
        for name in names:  # images and train written out too: dvc.yaml reads them per concept
            concepts_yaml[name] = {"class_word": TOY_CONCEPTS[name].class_word, "images": images.as_posix(),
                                   "train": dict(settings)}
    for name in single_concepts:
        write_concept_images(folder / "concepts" / name, name, photos_per_group, seed)
        masks = folder / "concepts" / f"{name}_masks"
        masks.mkdir(parents=True, exist_ok=True)
        from conceptflow.toy.concepts import render_concept_images

        for index, view in enumerate(render_concept_images(TOY_CONCEPTS[name], photos_per_group, seed)):
            Image.fromarray(view.masks[0].astype(np.uint8) * 255, mode="L").save(masks / f"{index:02d}.png")
        concepts_yaml[name] = {"class_word": TOY_CONCEPTS[name].class_word, "images": f"concepts/{name}",
                               "masks": f"concepts/{name}_masks",
                               "train": {"method": "edlora", "steps": train_steps, "lr_embeddings": TOY_EMBEDDING_LR,
                                         "checkpoint_every": max(1, train_steps // 3)}}
    combinations = combinations if combinations is not None else {"+".join(names): names for names in groups.values()}
    combinations_yaml = {
        key: {"concepts": list(pair), "prompts": [" and ".join(f"a <{n}>" for n in pair)], "seeds": list(prompt_seeds)}
        for key, pair in combinations.items()}
    catalog = {
        "project": "conceptflow-toy-groups", "base_model": base_model, "device": "cpu", "dtype": "float32",
        "resolution": IMAGE_SIZE, "seed": seed, "mask": {"backend": "ground_truth"},
        "groups": groups_yaml, "concepts": concepts_yaml, "combinations": combinations_yaml,
        # written out (defaults) because dvc.yaml lists them as params
        "fuse": {"method": "gradient"}, "generate": {"sampler": "fused"}, "evaluate": {"toy_evaluators": None},
    }
    path = folder / "catalog.yaml"
    path.write_text("# Toy-world groups written by conceptflow.toy.groups.write_toy_group_catalog\n"
                    + yaml.safe_dump(catalog, sort_keys=False))
    return path
