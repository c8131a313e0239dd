"""The toy world: seeded scenes whose masks, captions and concept views are ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from conceptflow.config import load_catalog
from conceptflow.toy.concepts import TOY_CONCEPTS, random_look, render_concept_images, write_toy_catalog
from conceptflow.toy.world import (
    BACKGROUNDS,
    POSITION_PHRASES,
    Background,
    Scene,
    SceneObject,
    caption,
    make_scene,
    render,
    sample_scene,
    scene_stream,
    vocabulary_look,
)


def test_same_seed_same_scene_and_different_seed_different_scene():
    first, again, other = make_scene(7), make_scene(7), make_scene(8)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert first.caption == again.caption
    assert all(np.array_equal(a, b) for a, b in zip(first.masks, again.masks))
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_stream_is_reproducible():
    a, b = scene_stream(3), scene_stream(3)
    for _ in range(5):
        x, y = next(a), next(b)
        assert x.caption == y.caption and np.array_equal(np.asarray(x.image), np.asarray(y.image))


@pytest.mark.parametrize("seed", range(12))
def test_masks_match_drawn_pixels(seed):
    """Outside every mask the image is the background; inside a plain object's eroded mask it
    is the object's colour; masks of different objects never overlap."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    # plain fills make "inside = the object's colour" exact
    scene = Scene(scene.background, tuple(
        SceneObject(vocabulary_look(o.shape, o.colour, "plain"), o.center, o.radius, o.shape, o.colour, "plain",
                    o.size, o.position) for o in scene.objects))
    drawn = render(scene)
    pixels = np.asarray(drawn.image).astype(np.float32)
    background = scene.background.render()
    coverages = [o.look.coverage(o.center, o.radius) for o in scene.objects]
    union = np.zeros(pixels.shape[:2], bool)
    for index, (obj, mask) in enumerate(zip(scene.objects, drawn.masks)):
        assert mask.sum() > 20, "every object stays visible"
        assert not (mask & union).any()
        union |= mask
        interior = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
        interior &= coverages[index] == 1
        for later in coverages[index + 1:]:  # a later object's anti-aliased edge may tint it
            interior &= later == 0
        colour = np.asarray(obj.look.colours[0], np.float32)
        assert interior.sum() > 5 and np.abs(pixels[interior] - colour).max() <= 1.0
    # anti-aliased edges blend: where no object covers any of a pixel, it is the background,
    # and the masks hold every pixel an object covers by more than half
    coverage = np.max(coverages, axis=0)
    assert np.abs(pixels[coverage == 0] - background[coverage == 0]).max() <= 1.0
    assert np.array_equal(union, coverage > 0.5)
    assert (np.abs(pixels[~union] - background[~union]).max(-1) > 1.0).mean() < 0.05


@pytest.mark.parametrize("seed", range(20))
def test_full_caption_names_every_attribute(seed):
    drawn = make_scene(seed)
    for obj in drawn.scene.objects:
        for word in (obj.shape, obj.colour, obj.size, POSITION_PHRASES[obj.position]):
            assert word in drawn.caption
        if obj.pattern != "plain":
            assert obj.pattern in drawn.caption
    assert drawn.scene.background.name in drawn.caption


def test_terse_captions_still_name_shape_and_colour():
    rng = np.random.default_rng(0)
    for _ in range(30):
        scene = sample_scene(rng)
        text = caption(scene, rng, drop_probability=1.0)
        assert "background" not in text and "left" not in text and "center" not in text
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape}" in text


def test_object_colours_contrast_with_background():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = sample_scene(rng)
        for obj in scene.objects:
            distance = np.linalg.norm(np.subtract(obj.look.colours[0], BACKGROUNDS[scene.background.name]))
            assert distance >= 110


def test_concept_views_vary_placement_but_keep_the_look():
    concept = TOY_CONCEPTS["zigzag_star"]
    views = render_concept_images(concept, count=5, seed=0)
    centers = {v.scene.objects[0].center for v in views}
    radii = {round(v.scene.objects[0].radius, 3) for v in views}
    backgrounds = {v.scene.background for v in views}
    assert len(centers) == 5 and len(radii) == 5 and len(backgrounds) >= 2
    assert all(v.scene.objects[0].look == concept.look for v in views)
    # every slot and size is used, and each caption says where, how big and on what
    assert {v.scene.objects[0].position for v in views} == {"left", "center", "right"}
    assert {v.scene.objects[0].size for v in views} == {"small", "big"}
    for view in views:
        obj = view.scene.objects[0]
        assert view.caption == (f"a {obj.size} <zigzag_star> {POSITION_PHRASES[obj.position]}, "
                                f"on {view.scene.background.phrase}")
    # the object's own pixels use the look's two colours (up to anti-aliasing at the edges)
    for view in views:
        pixels = np.asarray(view.image).astype(np.float32)[view.masks[0]]
        distance = np.min([np.linalg.norm(pixels - np.asarray(c, np.float32), axis=1) for c in concept.look.colours], 0)
        assert np.mean(distance < 40) > 0.8


def test_similar_concepts_share_a_class_but_differ_in_look():
    by_class: dict[str, list] = {}
    for concept in TOY_CONCEPTS.values():
        by_class.setdefault(concept.class_word, []).append(concept)
    assert max(len(group) for group in by_class.values()) >= 3
    looks = [c.look for c in TOY_CONCEPTS.values()]
    assert len(set(looks)) == len(looks)


def test_random_looks_are_seeded():
    assert random_look(np.random.default_rng(4)) == random_look(np.random.default_rng(4))


def test_toy_catalog_loads_and_points_to_images(tmp_path):
    path = write_toy_catalog(tmp_path, ["zigzag_star", "quartered_heart"], images_per_concept=4)
    catalog = load_catalog(path)
    assert [c.name for c in catalog.concepts] == ["zigzag_star", "quartered_heart"]
    assert catalog.concept("zigzag_star").class_word == "star"
    for concept in catalog.concepts:
        assert len(list(catalog.images_dir(concept).glob("*.png"))) == 4
    assert catalog.combinations[0].concepts == ("zigzag_star", "quartered_heart")


def test_default_catalog_concepts_are_the_generators_renders():
    """assets/toy-concepts holds exactly what write_concept_images renders, so the default
    catalog's data can be regenerated (and a change to the world shows up here)."""
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    catalog = load_catalog(root / "catalog.yaml")
    for concept in catalog.concepts:
        folder = catalog.images_dir(concept)
        files = sorted(folder.glob("*.png"))
        views = render_concept_images(TOY_CONCEPTS[concept.name], len(files))
        assert files and concept.class_word == TOY_CONCEPTS[concept.name].class_word
        for file, view in zip(files, views):
            with Image.open(file) as image:
                assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(view.image))
            assert file.with_suffix(".txt").read_text().strip() == view.caption


def test_two_object_scenes_take_both_sides_and_three_objects_are_small():
    rng = np.random.default_rng(3)
    for _ in range(20):
        two = sample_scene(rng, object_count=2)
        assert [o.position for o in two.objects] == ["left", "right"]
        three = sample_scene(rng, object_count=3)
        assert {o.size for o in three.objects} == {"small"}
        xs = [o.center[0] for o in three.objects]
        radii = [o.radius for o in three.objects]
        assert all(b - a > ra + rb - 2 for a, b, ra, rb in zip(xs, xs[1:], radii, radii[1:]))  # barely touch at most
