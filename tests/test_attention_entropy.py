import math

import pytest
import torch

from conceptflow.metrics.attention_entropy import entropy_change, map_entropy


def test_uniform_map_has_log_n_entropy():
    assert map_entropy(torch.zeros(4, 4)).item() == pytest.approx(math.log(16))


def test_hand_computed_two_pixel_map():
    # softmax([0, log 3]) = [1/4, 3/4]
    m = torch.tensor([[0.0, math.log(3.0)]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert map_entropy(m).item() == pytest.approx(expected)


def test_entropy_change_is_mean_step_difference():
    steps = torch.stack([torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2)])
    h0 = math.log(2)
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_change(steps).item() == pytest.approx(((h1 - h0) + (h0 - h1)) / 2)
    with pytest.raises(ValueError):
        entropy_change(torch.zeros(1, 2, 2))


def test_map_side_is_a_quarter_of_the_latent_side_or_the_nearest():
    from conceptflow.metrics.attention_entropy import entropy_map_side

    assert entropy_map_side(96, [96, 48, 24, 12]) == 24  # SD 2.1 at 768 px: ConceptSplit's 24
    assert entropy_map_side(64, [64, 32, 16, 8]) == 16  # SD 1.x at 512 px
    assert entropy_map_side(16, [16, 8]) == 8  # the toy base: no 4, 8 is nearest


def test_step_maps_average_the_chosen_layers_and_each_concepts_two_tokens():
    from conceptflow.metrics.attention_entropy import step_concept_maps

    rows, side = 1, 4
    fine = torch.rand(2 * rows, 16 * 16, 4)  # a 16x16 layer: not read (latent side 16 reads side 4)
    coarse_a, coarse_b = torch.rand(2 * rows, side * side, 4), torch.rand(2 * rows, side * side, 4)
    maps = step_concept_maps([fine, coarse_a, coarse_b], rows, 2, latent_side=16)
    expected = ((coarse_a[-rows:] + coarse_b[-rows:]) / 2).transpose(1, 2).reshape(rows, 2, 2, side, side).mean(2)
    assert maps.shape == (rows, 2, side, side) and torch.allclose(maps, expected)


def test_sampling_entropy_change_matches_maps_recorded_independently(concept_pipeline):
    from conceptflow.attention.processor import AttentionHook
    from conceptflow.metrics.attention_entropy import sampling_entropy_changes
    from conceptflow.sample.conceptflow_m.pipeline import concept_token_positions, named_concepts
    from conceptflow.sample.core import SampleRequest, SamplingCore

    tiny_pipeline = concept_pipeline  # the tiny base with <dog> and <cat> tokens
    requests = [SampleRequest("a <dog> and a <cat>", 3), SampleRequest("a photo of a <cat>", 4)]
    changes = sampling_entropy_changes(tiny_pipeline, requests, ["dog", "cat"], 64, steps=4, guidance_scale=7.5)
    assert list(changes[0]) == ["dog", "cat"] and list(changes[1]) == ["cat"]

    class Every(AttentionHook):  # every cross-attention call's probabilities at the 8x8 layers
        def __init__(self):
            self.calls = []

        def wants_probs(self, layer):
            return layer.is_cross

        def on_probs(self, layer, probs):
            if probs.shape[2] == 64:
                self.calls.append(probs.mean(1).detach())

    core = SamplingCore(tiny_pipeline)
    prompts = [r.prompt for r in requests]
    positions = concept_token_positions(prompts, tiny_pipeline.tokenizer, ["dog", "cat"],
                                        named_concepts(prompts, ["dog", "cat"]))
    hook = Every()
    core.denoise(core.initial_latents([3, 4], 64), core.encode(prompts, ["dog", "cat"]), 4,
                 uncond=core.encode_uncond(2), guidance_scale=7.5, hooks=(hook,))
    per_call = len(hook.calls) // 4
    for i, k, name in ((0, 0, "dog"), (0, 1, "cat"), (1, 1, "cat")):
        entropies = []
        for step in range(4):
            layers = hook.calls[step * per_call:(step + 1) * per_call]
            token_map = torch.stack([probs[2 + i][:, positions[i, 2 * k:2 * k + 2]].mean(1) for probs in layers]).mean(0)
            p = torch.softmax(token_map.double(), 0)
            entropies.append(float(-(p * p.log()).sum()))
        expected = sum(b - a for a, b in zip(entropies, entropies[1:])) / 3
        assert changes[i][name] == pytest.approx(expected, rel=1e-6, abs=1e-12)
