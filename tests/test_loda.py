"""ConceptSplit LODA (seed 003, Algorithm 1): the equations on hand-computed maps, the latent step
inside the sampling core, the switches off reproducing plain sampling, and the sampler on the tiny base."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptflow.adapters.branched import runtime_concepts
from conceptflow.adapters.concept_io import get_linear
from conceptflow.adapters.effects import ConceptEffects, TokenDelta
from conceptflow.adapters.tokens import concept_token_strings
from conceptflow.attention.processor import CrossAttentionMapRecorder, attention_controller_of
from conceptflow.config import GenerateConfig
from conceptflow.sample import SAMPLERS
from conceptflow.sample.conceptflow_m.pipeline import concept_token_positions, named_concepts
from conceptflow.sample.conceptflow_m.sama import mean_concept_maps
from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.sample.fused import sample_images
from conceptflow.sample.loda.config import LodaConfig
from conceptflow.sample.loda.loss import (
    choose_map_side,
    cross_layer_sides,
    harmonic_mean_kl,
    loda_losses,
    smooth_maps,
    step_sizes,
    to_distributions,
)
from conceptflow.sample.loda.pipeline import LodaGuide, sample_loda

CONCEPTS = ("dog", "cat")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(total_steps=4, batch_size=4, **loda):
    return GenerateConfig(sampler="loda", steps=total_steps, batch_size=batch_size, loda=loda)


def two_cell_maps(*rows):
    """Maps (1, K, 1, 2) whose distributions are the given two-cell rows."""
    return torch.tensor([rows], dtype=torch.float64).unsqueeze(2)


# ------------------------------------------------------------------------------------ the equations
def test_harmonic_mean_of_two_maps_is_their_kl():
    p, q = (0.75, 0.25), (0.25, 0.75)
    maps = two_cell_maps(p, q)
    valid = torch.ones(1, 2, dtype=torch.bool)
    kl_pq = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)  # = 0.5 ln 3
    value = harmonic_mean_kl(to_distributions(maps), valid)
    assert float(value) == pytest.approx(kl_pq, abs=1e-8) == pytest.approx(0.5 * math.log(3), abs=1e-8)


def test_harmonic_mean_of_three_maps_by_hand_and_both_directions():
    a, b, c = (0.5, 0.5), (0.75, 0.25), (0.25, 0.75)
    distributions = to_distributions(two_cell_maps(a, b, c))
    valid = torch.ones(1, 3, dtype=torch.bool)

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    upper = [kl(a, b), kl(a, c), kl(b, c)]  # i < j, as the reference code
    assert upper[0] == pytest.approx(0.5 * math.log(4 / 3))
    expected = 3 / sum(1 / value for value in upper)
    assert float(harmonic_mean_kl(distributions, valid)) == pytest.approx(expected, abs=1e-8)
    both = upper + [kl(b, a), kl(c, a), kl(c, b)]  # i != j, as Algorithm 1 writes it
    assert float(harmonic_mean_kl(distributions, valid, symmetric=True)) == pytest.approx(
        6 / sum(1 / value for value in both), abs=1e-8)
    # a concept the prompt does not name is left out: only the (a, b) pair remains
    assert float(harmonic_mean_kl(distributions, torch.tensor([[True, True, False]]))) == pytest.approx(upper[0])


def test_loss_is_relu_of_threshold_minus_harmonic_mean_and_zero_without_a_pair():
    maps = torch.cat([two_cell_maps((0.75, 0.25), (0.25, 0.75))] * 2)  # (2, 2, 1, 2)
    valid = torch.tensor([[True, True], [True, False]])
    losses = loda_losses(maps, valid, threshold=1.0, kernel=1)
    assert losses.tolist() == pytest.approx([1.0 - 0.5 * math.log(3), 0.0])
    assert loda_losses(maps, valid, threshold=0.5 * math.log(3) - 1e-3, kernel=1).tolist() == [0.0, 0.0]


def test_disjoint_blobs_are_far_apart_and_identical_maps_cost_the_full_threshold():
    maps = torch.zeros(1, 2, 24, 24)
    maps[0, 0, 2:8, 2:8], maps[0, 1, 15:21, 15:21] = 1.0, 1.0
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert float(loda_losses(maps, valid, threshold=3.0)) == 0.0  # smoothed blobs barely overlap: KL >> 3
    same = maps[:, :1].expand(-1, 2, -1, -1)
    assert float(loda_losses(same, valid, threshold=3.0)) == pytest.approx(3.0)


def test_reference_border_is_the_reference_padding_and_attend_and_excite_kernel():
    """pad 1 (reflect) + valid conv with A&E's kernel exp(-((x - mu) / (2 sigma))^2), sigma 1: our sigma sqrt(2)."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 24, 24, generator=generator)
    x = torch.arange(7, dtype=torch.float32)
    one_d = torch.exp(-(((x - 3) / (2 * 1.0)) ** 2))
    kernel = torch.outer(one_d, one_d)
    kernel = (kernel / kernel.sum()).view(1, 1, 7, 7)
    expected = F.conv2d(F.pad(maps.view(-1, 1, 24, 24), (1, 1, 1, 1), mode="reflect"), kernel).view(2, 3, 20, 20)
    ours = smooth_maps(maps, 7, LodaConfig().sigma, border="reference")
    assert ours.shape == (2, 3, 20, 20)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    same = smooth_maps(maps, 7, LodaConfig().sigma, border="same")
    assert same.shape == maps.shape
    torch.testing.assert_close(same[..., 2:-2, 2:-2], expected, rtol=0, atol=1e-6)  # equal away from the border
    with pytest.raises(ValueError, match="side"):
        smooth_maps(torch.rand(1, 1, 4, 4), 7, 1.0, border="reference")


def test_step_size_schedule_is_the_references():
    total = 50
    np.testing.assert_allclose(step_sizes(total), 20 * np.sqrt(np.linspace(1, 0.5, total)), rtol=0, atol=0)
    assert step_sizes(total)[0] == 20 and step_sizes(total)[-1] == pytest.approx(20 * math.sqrt(0.5))
    assert step_sizes(4, 2.0, 1.0, 0.25).tolist() == pytest.approx([2.0, 2 * math.sqrt(0.75), 2 * math.sqrt(0.5), 1.0])


def test_map_resolution_is_a_quarter_of_the_latent_side():
    assert choose_map_side([96, 48, 24, 12], 96) == 24  # SD 2.1 at 768 px: the reference's RES 24
    assert choose_map_side([64, 32, 16, 8], 64) == 16  # SD 1.x at 512 px
    assert choose_map_side([16, 8, 4], 16) == 4  # the toy base at 64 px
    assert choose_map_side([16, 8], 16) == 8  # embedded:tiny-sd: nearest existing
    assert choose_map_side([16, 8], 16, requested=16) == 16
    with pytest.raises(ValueError, match="side 4"):
        choose_map_side([16, 8], 16, requested=4)


def test_layer_sides_match_the_recorded_queries(concept_pipeline):
    unet = concept_pipeline.unet
    controller = attention_controller_of(unet)
    sides = cross_layer_sides(controller.layers, 16, len(unet.config.block_out_channels))
    recorder = CrossAttentionMapRecorder(torch.tensor([1]))
    with torch.no_grad(), controller.use(recorder):
        unet(torch.zeros(1, 4, 16, 16), torch.tensor(10), encoder_hidden_states=torch.zeros(1, 77, 32))
    assert sides.keys() == recorder.maps.keys()
    assert all(recorder.maps[name].shape[1] == side**2 for name, side in sides.items())


def test_config_defaults_follow_the_reference_and_sit_in_the_catalog():
    config = LodaConfig()
    assert (config.steps, config.inner_steps, config.threshold, config.kernel, config.step_size,
            config.step_size_range) == (10, 10, 3.0, 7, 20.0, (1.0, 0.5))
    assert config.sigma == pytest.approx(math.sqrt(2))  # = the reference's sigma 1 (A&E's kernel)
    assert SAMPLERS["loda"].config is LodaConfig and GenerateConfig(sampler="loda").steps == 50
    assert GenerateConfig(sampler="loda", loda={"threshold": 1.0}).loda.threshold == 1.0
    with pytest.raises(ValueError, match="odd"):
        LodaConfig(kernel=6)
    assert not LodaConfig(steps=0).active and not LodaConfig(enabled=False).active


# ------------------------------------------------------------------------------------ the latent step
def guide_for(pipeline, prompts, total_steps=10, **loda):
    core = SamplingCore.of(pipeline)
    valid = named_concepts(prompts, CONCEPTS)
    positions = concept_token_positions(prompts, pipeline.tokenizer, CONCEPTS, valid)
    text = core.encode(prompts, CONCEPTS)
    return LodaGuide(core, text, positions, valid, LodaConfig(**loda), total_steps, 16)


def test_gradient_reaches_the_latents_below_threshold_and_follows_the_schedule(concept_pipeline):
    prompts = ["a <dog> and a <cat>", "a <cat> beside a <dog>", "a <dog> alone"]
    guide = guide_for(concept_pipeline, prompts, inner_steps=1)
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    timestep = torch.tensor(900)
    variable = latents.clone().requires_grad_(True)
    losses = guide.losses(variable, timestep)
    assert (losses[:2] > 0).all() and losses[2] == 0  # the single-concept prompt has no pair
    (gradient,) = torch.autograd.grad(losses.sum(), variable)
    assert torch.isfinite(gradient).all() and gradient[:2].abs().amax(dim=(1, 2, 3)).gt(0).all()
    moved = guide(latents, timestep, step_index=3)
    torch.testing.assert_close(moved, latents - step_sizes(10)[3] * gradient, rtol=0, atol=1e-6)
    assert torch.equal(moved[2], latents[2])  # images stay independent
    with torch.no_grad():
        after = guide.losses(moved, timestep)
    assert (after[:2] < losses[:2].detach()).all()
    assert torch.equal(guide(latents, timestep, step_index=10), latents)  # after step N: untouched


def test_truncated_pass_gives_the_full_unet_gradient(concept_pipeline):
    prompts = ["a <dog> and a <cat>"]
    guide = guide_for(concept_pipeline, prompts)
    assert guide.map_side == 8 and not any(name.startswith("up_blocks.1") for name in guide.layer_names)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    timestep = torch.tensor(700)
    variable = latents.clone().requires_grad_(True)
    (truncated,) = torch.autograd.grad(guide.losses(variable, timestep).sum(), variable)
    recorder = CrossAttentionMapRecorder(guide.token_positions, guide.layer_names, keep_graph=True)
    variable = latents.clone().requires_grad_(True)
    with guide.core.controller.use(recorder):
        concept_pipeline.unet(variable, timestep, encoder_hidden_states=guide.text)
    maps = mean_concept_maps([recorder.maps[name].double() for name in guide.layer_names], 2, guide.map_side)
    (full,) = torch.autograd.grad(loda_losses(maps, guide.valid, sigma=LodaConfig().sigma).sum(), variable)
    torch.testing.assert_close(truncated, full, rtol=0, atol=1e-7)


def test_loss_above_threshold_leaves_the_latents_and_stops_the_inner_loop(concept_pipeline):
    prompts = ["a <dog> and a <cat>"]
    guide = guide_for(concept_pipeline, prompts, threshold=1e-9, inner_steps=5)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    moved = guide(latents, torch.tensor(900), step_index=0)
    assert moved is latents
    assert [(step, inner) for step, inner, _ in guide.trace] == [(0, 0)] and guide.trace[0][2] == [0.0]


def test_runtime_concepts_change_the_maps_loda_reads(concept_pipeline):
    """A run-time (token-position) concept on a read layer's keys: LODA sees its maps and still steps."""
    prompts = ["a <dog> and a <cat>"]
    guide = guide_for(concept_pipeline, prompts, inner_steps=1)
    path = "unet." + guide.layer_names[0].removesuffix("attn2") + "attn2.to_k"
    weight = get_linear(concept_pipeline, path).weight.detach()
    delta = 3 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(6))
    n_layers = guide.core.n_layers
    concept = ConceptEffects({"name": "dog"}, token_deltas={
        path: TokenDelta(delta, tuple(concept_token_strings("dog", n_layers)))})
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    timestep = torch.tensor(800)
    with torch.no_grad():
        base_loss = guide.losses(latents, timestep)
    with runtime_concepts(concept_pipeline, [concept]):
        guide.text = guide.core.encode(prompts, CONCEPTS)  # encoded inside: the handle finds the token ids
        with torch.no_grad():
            concept_loss = guide.losses(latents, timestep)
        moved = guide(latents, timestep, step_index=0)
    assert not torch.equal(concept_loss, base_loss)
    assert torch.isfinite(moved).all() and not torch.equal(moved, latents)


# ------------------------------------------------------------------------------------ the sampler
REQUESTS = [SampleRequest("a <dog> and a <cat>", 3), SampleRequest("a <cat> on grass", 4),
            SampleRequest("a <dog> and a <cat>", 5)]


@pytest.mark.parametrize("switch", [{"enabled": False}, {"steps": 0}, {"threshold": 1e-9}])
def test_switches_off_reproduce_fused_sampling_bit_for_bit(concept_pipeline, switch):
    """LODA off, or on with every loss above threshold (the guide passes, nothing moves)."""
    config = settings(total_steps=3, batch_size=2, inner_steps=2, **switch)
    plain = sample_images(concept_pipeline, REQUESTS, CONCEPTS, 64, 3, config.guidance_scale, 2)
    loda = sample_loda(concept_pipeline, REQUESTS, CONCEPTS, 64, config, attention_maps=False)
    assert loda.attention_maps is None
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, loda.images))


def test_sampler_on_the_tiny_base_returns_images_maps_and_plain_images(concept_pipeline):
    config = settings(total_steps=4, batch_size=2, steps=2, inner_steps=2)
    result = SAMPLERS["loda"].sample(concept_pipeline, REQUESTS, CONCEPTS, 64, config)
    plain = sample_images(concept_pipeline, REQUESTS, CONCEPTS, 64, 4, config.guidance_scale, 2)
    assert len(result.images) == len(result.plain_images) == 3 and result.images[0].size == (64, 64)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, result.plain_images))
    assert [sorted(maps) for maps in result.attention_maps] == [["cat", "dog"], ["cat"], ["cat", "dog"]]
    for maps in result.attention_maps:
        for value in maps.values():
            assert value.shape == (16, 16) and value.min() == 0 and value.max() == pytest.approx(1)
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, plain)]
    assert moved[0] and moved[2]  # two-concept prompts: LODA moved their latents
