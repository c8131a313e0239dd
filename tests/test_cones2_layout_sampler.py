"""Cones 2 layout guidance: the score bias (reference layout_guidance.py l.82, 197-221), the seed project's
three switches and the sampler on the toy base."""

import math

import numpy as np
import pytest
import torch

from conceptflow.attention.processor import AttentionLayer, attention_layers
from conceptflow.config import GenerateConfig
from conceptflow.sample import SAMPLERS
from conceptflow.sample.boxes import box_masks
from conceptflow.sample.cones2_layout.guidance import (
    LayoutBiasHook,
    high_resolution_layers,
    layout_bias,
    padding_mask,
    sigma_cfg_scale,
    token_weights,
)
from conceptflow.sample.cones2_layout.pipeline import Cones2LayoutBatch, prompt_lengths, sample_cones2_layout
from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.sample.fused import sample_images

CONCEPTS = ("dog", "cat")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIDE_BY_SIDE = {"dog": (0.0, 0.0, 0.5, 1.0), "cat": (0.5, 0.0, 1.0, 1.0)}
CROSS = AttentionLayer("down_blocks.0.attentions.0.transformer_blocks.0.attn2", True, 0, "down_blocks", 0)


def settings(steps=5, batch_size=4, **cones2_layout):
    return GenerateConfig(sampler="cones2_layout", steps=steps, batch_size=batch_size, cones2_layout=cones2_layout)


OFF = dict(guidance_weight=0.0, high_resolution_only=False, sigma_aware_cfg=False, pad_prompts=False)


def inside_fraction(batch: Cones2LayoutBatch) -> torch.Tensor:
    """(N, K) share of each concept's mean cross-attention map that lies inside its box."""
    raw = batch.raw_maps()
    masks = torch.stack([box_masks({name: boxes[name] for name in CONCEPTS}, raw.shape[-1]) for boxes in batch.boxes])
    return (raw * masks).sum((2, 3)) / raw.sum((2, 3))


# ------------------------------------------------------------------------------------------ the equation
def test_bias_equals_the_formula_hand_computed():
    """2x2 map, 4 tokens, concept <dog> at tokens 1 and 2 with the left half as its box, sigma 1."""
    scores = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)  # (N, heads, Q, T)
    std = math.sqrt(sum((x - 7.5) ** 2 for x in range(16)) / 15)  # unbiased, as the reference's qk.std()
    factor = 0.1 * math.log(2.0) * std  # guidance_weight * log(1 + sigma^2) * std(QK)
    a, b = 2.5 * factor, -1e8 * factor
    expected = torch.tensor([[0, a, a, 0],   # q0 = (row 0, col 0): inside
                             [0, b, b, 0],   # q1 = (row 0, col 1): outside
                             [0, a, a, 0],   # q2 = (row 1, col 0): inside
                             [0, b, b, 0]])  # q3: outside
    hook = LayoutBiasHook([{"dog": (0.0, 0.0, 0.5, 1.0)}], ["dog"], torch.tensor([[1, 2]]), torch.tensor([[True]]),
                          guidance_weight=0.1, inside=2.5, outside=-1e8, bias_layers={CROSS.name})
    weights = hook.weights(4, 4)
    torch.testing.assert_close(layout_bias(scores, weights, 1.0, 0.1)[0, 0], expected)
    # in the [uncond, cond] batch: the unconditional half is untouched, the conditional gets the bias
    uncond = torch.randn(1, 1, 4, 4)
    hook.sigma = 1.0
    edited = hook.edit_scores(CROSS, torch.cat([uncond, scores]))
    assert torch.equal(edited[0], uncond[0])
    torch.testing.assert_close(edited[1, 0], scores[0, 0] + expected)
    assert hook.edited == [CROSS.name]


def test_bias_is_zero_off_the_concepts_tokens_and_positive_only_inside_their_boxes():
    boxes = {"dog": (0.0, 0.0, 0.5, 0.5), "cat": (0.25, 0.5, 1.0, 1.0)}
    masks = box_masks(boxes, 4).flatten(1)[None]  # (1, K=2, 16)
    positions = torch.tensor([[2, 3, 6, 7], [5, 6, 0, 0]])  # image 1 names only <dog>
    valid = torch.tensor([[True, True], [True, False]])
    weights = token_weights(masks.expand(2, -1, -1), positions, valid, 10, inside=2.5, outside=0.0)
    for i in range(2):
        for t in range(10):
            owner = [k for k in range(2) if valid[i, k] and t in positions[i, 2 * k : 2 * k + 2].tolist()]
            expected = 2.5 * masks[0, owner[0]] if owner else torch.zeros(16)
            assert torch.equal(weights[i, :, t], expected), (i, t)
    assert (weights > 0).sum() == 2 * (4 + 6) + 2 * 4  # dog's 4 cells and cat's 6, two tokens each; image 1: dog
    with_negative = token_weights(masks.expand(2, -1, -1), positions, valid, 10, inside=2.5, outside=-1e8)
    off_tokens = [t for t in range(10) if t not in (2, 3, 6, 7)]
    assert with_negative[0][:, off_tokens].abs().sum() == 0  # BOS, words, padding: no bias
    assert torch.equal(with_negative[0][:, 2] < 0, masks[0, 0] == 0)  # -1e8 exactly outside dog's box


def test_sigma_aware_scale_hand_computed():
    sigma0 = 14.6146
    assert sigma_cfg_scale(7.5, sigma0, sigma0, 0.5) == pytest.approx(7.5)
    assert sigma_cfg_scale(7.5, 0.0, sigma0, 0.5) == pytest.approx(1 + 6.5 * 0.5)
    expected = 1 + 6.5 * (0.5 + 0.5 * math.log(1 + 1.0) / math.log(1 + sigma0**2))
    assert sigma_cfg_scale(7.5, 1.0, sigma0, 0.5) == pytest.approx(expected)
    assert sigma_cfg_scale(7.5, 1.0, sigma0, 1.0) == pytest.approx(7.5)  # floor 1: the constant scale


def test_padding_mask_hand_computed():
    assert padding_mask([2, 4], 5).tolist() == [[False, False, True, True, True], [False, False, False, False, True]]


# --------------------------------------------------------------------------------------- the switches
def test_high_resolution_layers_are_the_higher_half_of_the_resolutions(tiny_pipeline):
    from diffusers import UNet2DConditionModel

    from conceptflow.models.embedded import SD15_UNET_CONFIG

    with torch.device("meta"):
        sd15 = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
    kept = high_resolution_layers(sd15, attention_layers(sd15))
    blocks = sorted({".".join(name.split(".")[:2]) for name in kept})
    assert blocks == ["down_blocks.0", "down_blocks.1", "up_blocks.2", "up_blocks.3"]  # 64x64 and 32x32 at 512 px
    assert len(kept) == 2 + 2 + 3 + 3
    tiny = high_resolution_layers(tiny_pipeline.unet, attention_layers(tiny_pipeline.unet))
    assert sorted(tiny) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                            "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                            "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]  # its 16x16 layers, not 8x8


def test_high_resolution_only_touches_only_those_layers(concept_pipeline):
    core = SamplingCore(concept_pipeline)
    requests = [SampleRequest("a <dog> and a <cat>", 0, SIDE_BY_SIDE)]
    seen: dict[str, set] = {}
    for high in (False, True):
        batch = Cones2LayoutBatch(core, requests, CONCEPTS, 64, settings(3, high_resolution_only=high), want_maps=False)
        original = batch.bias.edit_scores
        queries = set()

        def spy(layer, scores, original=original, queries=queries):
            before = len(batch.bias.edited)
            out = original(layer, scores)
            if len(batch.bias.edited) > before:
                queries.add(scores.shape[2])
            return out

        batch.bias.edit_scores = spy
        batch.run()
        seen[high] = set(batch.bias.edited)
        assert len(batch.bias.edited) == 3 * len(seen[high])  # every step
        if high:
            assert queries == {16 * 16}
    cross = {layer.name for layer in core.controller.layers if layer.is_cross}
    assert seen[False] == cross
    assert seen[True] == high_resolution_layers(core.unet, core.controller.layers) and len(seen[True]) == 3


def test_switches_off_reproduce_fused_sampling_bit_for_bit(concept_pipeline):
    requests = [SampleRequest("a <dog> and a <cat>", 3, SIDE_BY_SIDE), SampleRequest("a <cat> on grass", 4),
                SampleRequest("a <dog> and a <cat>", 5)]
    plain = sample_images(concept_pipeline, requests, CONCEPTS, 64, steps=3, batch_size=2)
    off = sample_cones2_layout(concept_pipeline, requests, CONCEPTS, 64, settings(3, batch_size=2, **OFF),
                               attention_maps=False).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(off, plain))
    # each switch alone changes the images (high_resolution_only only restricts the bias, so with a weight)
    for switch in (dict(guidance_weight=0.05), dict(sigma_aware_cfg=True), dict(pad_prompts=True)):
        images = sample_cones2_layout(concept_pipeline, requests, CONCEPTS, 64,
                                      settings(3, batch_size=2, **{**OFF, **switch}), attention_maps=False).images
        assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, plain)), switch


def test_hook_sigma_is_the_steps_sigma_and_sigma_cfg_uses_it(concept_pipeline):
    core = SamplingCore(concept_pipeline)
    requests = [SampleRequest("a <dog> and a <cat>", 1)]
    batch = Cones2LayoutBatch(core, requests, CONCEPTS, 64, settings(5, sigma_aware_cfg=True), want_maps=False)
    sigmas, scales = [], []
    edit, scale = batch.bias.edit_scores, batch.guidance_scale

    def spy_edit(layer, scores):
        sigmas.append(batch.bias.sigma)
        return edit(layer, scores)

    def spy_scale(step_index):
        scales.append(scale(step_index))
        return scales[-1]

    batch.bias.edit_scores, batch.guidance_scale = spy_edit, spy_scale
    batch.run()
    schedule = core.scheduler(5, "cpu").sigmas[:5].tolist()  # 14.6, 5.09, 2.28, 1.16, 0.57
    assert sorted(set(sigmas), reverse=True) == pytest.approx(schedule)
    assert scales == pytest.approx([1 + 6.5 * (0.5 + 0.5 * math.log1p(s**2) / math.log1p(schedule[0] ** 2))
                                    for s in schedule])


def test_callable_guidance_scale_in_the_core_equals_the_constant(concept_pipeline):
    core = SamplingCore(concept_pipeline)
    text, uncond = core.encode(["a <dog>"], CONCEPTS), core.encode_uncond(1)
    latents = core.initial_latents([2], 64)
    constant = core.denoise(latents, text, 3, uncond=uncond, guidance_scale=7.5)
    assert torch.equal(core.denoise(latents, text, 3, uncond=uncond, guidance_scale=lambda step: 7.5), constant)


def test_pad_prompts_equals_sampling_with_unpadded_text(concept_pipeline):
    """Masking the padding keys = encoding the prompt (and the empty prompt) to the prompt's own length."""
    core = SamplingCore(concept_pipeline)
    request = SampleRequest("a <dog> and a <cat>", 6)
    (length,) = prompt_lengths([request.prompt], concept_pipeline.tokenizer, CONCEPTS)
    assert length == 1 + 1 + 2 + 1 + 1 + 2 + 1  # BOS a <dog1> <dog2> and a <cat1> <cat2> EOS
    batch = Cones2LayoutBatch(core, [request], CONCEPTS, 64, settings(4, **{**OFF, "pad_prompts": True}), False)
    padded = batch.run()
    text, uncond = core.encode([request.prompt], CONCEPTS), core.encode_uncond(1)
    short = core.denoise(core.initial_latents([6], 64), text[:, :, :length], 4, uncond=uncond[:, :, :length],
                         guidance_scale=7.5)
    full = core.denoise(core.initial_latents([6], 64), text, 4, uncond=uncond, guidance_scale=7.5)
    torch.testing.assert_close(padded, short, rtol=1e-4, atol=1e-4)
    assert (padded - full).abs().amax() > 1e-2


# ----------------------------------------------------------------------------------------- the sampler
def test_sampler_on_the_toy_base_returns_images_maps_boxes_and_plain_images(concept_pipeline):
    requests = [SampleRequest("a <dog> and a <cat>", 0, SIDE_BY_SIDE), SampleRequest("a <dog> on the beach", 1),
                SampleRequest("a <cat> next to a <dog>", 2)]
    core = SamplingCore(concept_pipeline)
    result = SAMPLERS["cones2_layout"].sample(core, requests, CONCEPTS, 64, settings(4))
    assert [image.size for image in result.images] == [(64, 64)] * 3
    assert [sorted(maps) for maps in result.attention_maps] == [["cat", "dog"], ["dog"], ["cat", "dog"]]
    for maps in result.attention_maps:
        for array in maps.values():
            assert array.shape == (16, 16) and array.min() == 0.0 and array.max() == pytest.approx(1.0)
    # boxes: the layout's; without one, side-by-side columns over the named concepts in the prompt's order
    assert result.masks[0]["dog"][:, :8].all() and not result.masks[0]["dog"][:, 8:].any()
    assert result.masks[1]["dog"].all()  # the only concept of its prompt: the whole image
    assert result.masks[2]["cat"][:, :8].all() and result.masks[2]["dog"][:, 8:].all()
    assert not result.masks[2]["cat"][:, 8:].any()
    plain = sample_images(core, requests, CONCEPTS, 64, steps=4)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.plain_images, plain))
    assert all(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, plain))


def test_guidance_moves_each_concepts_attention_inside_its_box(concept_pipeline):
    """Measured: share of each concept's mean cross-attention map inside its box, with and without guidance."""
    core = SamplingCore(concept_pipeline)
    boxes = {"dog": (0.0, 0.0, 0.5, 1.0), "cat": (0.5, 0.25, 1.0, 1.0)}  # cat: 3/8 of the image
    requests = [SampleRequest("a <dog> and a <cat>", seed, boxes) for seed in range(4)]

    def fraction(**config):
        batch = Cones2LayoutBatch(core, requests, CONCEPTS, 64, settings(5, **config), want_maps=True)
        batch.run()
        return inside_fraction(batch).mean(0)

    without = fraction(guidance_weight=0.0)
    reference = fraction()  # -1e8 outside: the concept's tokens get no attention there
    inside_only = fraction(outside_weight=0.0, guidance_weight=0.3)  # only the +2.5 inside boost
    print(f"inside share dog/cat: none {without.tolist()}, reference {reference.tolist()}, "
          f"inside-only {inside_only.tolist()}")
    assert (without - torch.tensor([0.5, 0.375])).abs().max() < 0.05  # the toy base spreads attention evenly
    assert (reference > 0.95).all()  # < 1 only where the 8x8 layers' maps are upsampled across the box edge
    assert (inside_only > without + 0.1).all()


def test_defaults_follow_the_reference():
    config = GenerateConfig(sampler="cones2_layout")
    assert config.steps == 50
    c = config.cones2_layout
    assert (c.guidance_weight, c.inside_weight, c.outside_weight) == (0.05, 2.5, -1e8)
    assert (c.high_resolution_only, c.sigma_aware_cfg, c.pad_prompts) == (False, False, False)
