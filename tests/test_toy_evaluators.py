"""Toy evaluators: prompt parsing, metric bookkeeping, training at small scale, save/load;
and, when the committed evaluator weights exist, accuracy a random network cannot reach."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conceptflow.toy.concepts import TOY_CONCEPTS, random_look, render_concept_images
from conceptflow.toy.evaluators import (
    PAIRS,
    Recognition,
    ToyIdentityEncoder,
    ToyRecogniser,
    identity_similarity,
    omission_redundancy,
    prompt_alignment,
    prompt_pairs,
)
from conceptflow.toy.world import SHAPES, make_scene
from recipes.toy.evaluators import _variant, recogniser_batch, train_identity_encoder, train_recogniser

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EVALUATORS = Path(__file__).resolve().parents[1] / "assets" / "toy-base" / "evaluators"


@pytest.mark.parametrize("prompt, expected", [
    ("a red star", [("star", "red")]),
    ("a small red striped star on the left and a big blue circle", [("star", "red"), ("circle", "blue")]),
    ("a <zigzag_star> star and a heart", [("star", None), ("heart", None)]),
    ("a sky background with a big pink dotted diamond in the center", [("diamond", "pink")]),
    ("a photo of a dog", []),
])
def test_prompt_pairs(prompt, expected):
    assert prompt_pairs(prompt) == expected


@pytest.fixture(scope="module")
def tiny_recogniser(tmp_path_factory) -> ToyRecogniser:
    folder = tmp_path_factory.mktemp("recogniser")
    train_recogniser(folder, steps=2, batch_size=4, width=8, progress=False)
    return ToyRecogniser(folder)


class FixedRecogniser(ToyRecogniser):
    """A recogniser whose answers the test decides, to check the metric bookkeeping."""

    def __init__(self, recognition: Recognition):
        self.fixed = recognition

    def recognise(self, images):
        return self.fixed


def _recognition(seen: list[list[tuple[str, str | None]]], counts: list[int]) -> Recognition:
    pairs, shapes = torch.zeros(len(seen), len(PAIRS)), torch.zeros(len(seen), len(SHAPES))
    for row, objects in enumerate(seen):
        for shape, colour in objects:
            shapes[row, SHAPES.index(shape)] = 1
            if colour:
                pairs[row, PAIRS.index((shape, colour))] = 1
    colours = torch.stack([pairs[row].view(len(SHAPES), -1).amax(0) for row in range(len(seen))])
    return Recognition(pairs, shapes, torch.tensor(counts), colours)


def test_prompt_alignment_counts_asked_objects_seen():
    recogniser = FixedRecogniser(_recognition([[("star", "red")], [("circle", "green")]], [1, 1]))
    score = prompt_alignment(recogniser, [None, None], ["a red star and a blue circle", "a green circle"])
    assert score == pytest.approx(2 / 3)


def test_attribute_recall_scores_shape_and_colour_apart():
    from conceptflow.toy.evaluators import attribute_recall

    recogniser = FixedRecogniser(_recognition([[("star", "blue")], [("circle", "green")]], [1, 1]))
    recall = attribute_recall(recogniser, [None, None], ["a red star", "a green heart"])
    assert recall == {"shape": 0.5, "colour": 0.5}


def test_omission_and_redundancy():
    recogniser = FixedRecogniser(_recognition(
        [[("star", None), ("heart", None)], [("star", None)], [("star", None), ("heart", None), ("ring", None)]],
        [2, 1, 3]))
    rates = omission_redundancy(recogniser, [None] * 3, [["star", "heart"]] * 3)
    assert rates["omission_rate"] == pytest.approx(1 / 6)  # image 2 lacks its heart
    assert rates["redundancy_rate"] == pytest.approx(1 / 3)  # image 3 holds a third object


def test_text_embedding_matches_the_recognised_pairs():
    recogniser = FixedRecogniser(_recognition([[("star", "red")]], [1]))
    image = torch.nn.functional.normalize(recogniser.recognise(None).pairs, dim=-1)
    texts = ToyRecogniser.embed_texts(recogniser, ["a red star", "a blue star", "a star"])
    cosines = (image @ texts.T)[0]
    assert cosines[0] == pytest.approx(1.0) and cosines[1] == 0 and 0 < cosines[2] < 1


def test_recogniser_targets_follow_the_scene():
    pixels, pairs, pair_mask, shapes, colours, counts = recogniser_batch(np.random.default_rng(0), 16)
    assert torch.equal(colours.sum(-1) > 0, pairs.sum(-1) > 0)
    assert pixels.shape == (16, 3, 64, 64)
    assert torch.all(shapes.sum(-1) <= counts) and torch.all(pairs.sum(-1) <= counts)
    assert torch.all(pairs.sum(-1)[pair_mask == 1] >= 1 * (counts[pair_mask == 1] > 0))


def test_hard_negatives_change_exactly_one_thing():
    rng = np.random.default_rng(3)
    for _ in range(20):
        look = random_look(rng)
        variant = _variant(look, rng)
        changed = [look.parts != variant.parts, look.fill != variant.fill, look.colours != variant.colours]
        assert sum(changed) == 1


def test_save_load_round_trip_and_small_training(tmp_path, tiny_recogniser):
    images = [make_scene(i).image for i in range(3)]
    again = ToyRecogniser(tiny_recogniser.model_id)
    assert torch.equal(tiny_recogniser.embed_images(images), again.embed_images(images))
    losses = train_identity_encoder(tmp_path / "identity", steps=2, instances=4, width=8, progress=False)
    encoder = ToyIdentityEncoder(tmp_path / "identity")
    embeddings = encoder.embed_images(images)
    assert embeddings.shape == (3, 64) and torch.allclose(embeddings.norm(dim=-1), torch.ones(3))
    assert len(losses) == 2


def test_toy_encoders_plug_into_the_pipeline_metrics(tmp_path, tiny_recogniser):
    from conceptflow.metrics.evaluate import evaluate_images
    from conceptflow.toy.evaluators import toy_metric_encoders

    train_identity_encoder(tmp_path / "identity", steps=1, instances=4, width=8, progress=False)
    (tmp_path / "recogniser").symlink_to(tiny_recogniser.model_id)
    encoders = toy_metric_encoders(tmp_path)
    views = [v.image for v in render_concept_images(TOY_CONCEPTS["zigzag_star"], 4)]
    result = evaluate_images([(views[0], "a <zigzag_star>"), (views[1], "a <zigzag_star> on sand")],
                             {"zigzag_star": views[2:]}, {"zigzag_star": "star"}, encoders=encoders)
    assert -1 <= result["overall"]["clip_t"] <= 1 and -1 <= result["per_concept"]["zigzag_star"]["dino"] <= 1


@pytest.mark.skipif(not (EVALUATORS / "recogniser").is_dir(), reason="toy evaluator weights not committed")
def test_trained_recogniser_reads_held_out_scenes():
    recogniser = ToyRecogniser(EVALUATORS / "recogniser")
    scenes = [make_scene(100_000 + i, object_count=1) for i in range(40)]
    accuracy = prompt_alignment(recogniser, [s.image for s in scenes], [s.caption for s in scenes])
    assert accuracy >= 0.85  # a random network sees ~0 of 64 pairs
    counts = recogniser.recognise([make_scene(200_000 + i).image for i in range(40)]).counts
    truth = torch.tensor([len(make_scene(200_000 + i).scene.objects) for i in range(40)])
    assert (counts == truth).float().mean() >= 0.8


@pytest.mark.skipif(not (EVALUATORS / "identity").is_dir(), reason="toy evaluator weights not committed")
def test_trained_identity_encoder_tells_similar_concepts_apart():
    encoder = ToyIdentityEncoder(EVALUATORS / "identity")
    views = {name: [v.image for v in render_concept_images(c, 4, seed=7)] for name, c in TOY_CONCEPTS.items()}
    for name in ("zigzag_star", "split_star", "target_star"):  # three instances of one class
        same = identity_similarity(encoder, views[name][:2], views[name][2:])
        others = [identity_similarity(encoder, views[name][:2], views[o][2:])
                  for o in ("zigzag_star", "split_star", "target_star") if o != name]
        assert same > max(others)
