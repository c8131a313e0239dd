"""ConceptFlow-M: SAMA (Eq. 6-9), layout-consistency guidance (Eq. 10-11) and the batched sampler."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptflow.attention.processor import CrossAttentionMapRecorder, attention_controller_of
from conceptflow.config import GenerateConfig
from conceptflow.sample import SAMPLERS
from conceptflow.sample.conceptflow_m.layout_guidance import (
    LayoutGuidance,
    layout_layer_names,
    layout_loss,
    refine_maps,
    step_size,
)
from conceptflow.sample.conceptflow_m.pipeline import (
    ConceptFlowMBatch,
    concept_token_positions,
    named_concepts,
    plan_references,
    sample_conceptflow_m,
)
from conceptflow.sample.conceptflow_m.sama import (
    combine_values,
    correspondence,
    foreground_masks,
    masked_cost_volume,
    warp_values,
)
from conceptflow.sample.core import SampleRequest, SamplingCore
from conceptflow.sample.fused import sample_images

CONCEPTS = ("dog", "cat")


def settings(steps, sama=True, layout_guidance=True, batch_size=4, **extra):
    return GenerateConfig(sampler="conceptflow_m", steps=steps, batch_size=batch_size,
                          conceptflow_m={"sama": sama, "layout_guidance": layout_guidance, **extra})


# ------------------------------------------------------------------------------------ SAMA equations
def test_identity_correspondence_warp_returns_target_values():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 4, 16, 8, generator=generator)  # (B, heads, Q, d)
    identity = torch.arange(16).expand(2, 2, 16)  # (B, K, Q)
    warped = warp_values(values.unsqueeze(1).expand(-1, 2, -1, -1, -1), identity)
    assert torch.equal(warped, values.unsqueeze(1).expand_as(warped))
    masks = torch.zeros(2, 2, 16)
    masks[:, 0, :5], masks[:, 1, 9:12] = 1, 1
    torch.testing.assert_close(combine_values(values, warped, masks), values, rtol=0, atol=1e-6)


def test_warp_and_combine_follow_eq_7_and_8():
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(1, 2, 9, 3, generator=generator)
    references = torch.randn(1, 2, 2, 9, 3, generator=generator)  # (B, K, heads, P, d)
    flow = torch.randint(0, 9, (1, 2, 9), generator=generator)
    masks = torch.zeros(1, 2, 9)
    masks[0, 0, [0, 1, 2]], masks[0, 1, [6, 7]] = 1, 1
    combined = combine_values(target, warp_values(references, flow), masks)
    for q in range(9):
        owner = [k for k in range(2) if masks[0, k, q]]
        expected = references[0, owner[0], :, flow[0, owner[0], q]] if owner else target[0, :, q]
        torch.testing.assert_close(combined[0, :, q], expected)


def test_masked_cost_volume_ignores_features_outside_the_mask():
    generator = torch.Generator().manual_seed(2)
    target = torch.randn(1, 16, 6, generator=generator)
    reference = target[:, torch.randperm(16, generator=generator)] + 0.01 * torch.randn(1, 16, 6, generator=generator)
    mask = torch.zeros(1, 16)
    mask[0, 3:9] = 1
    cost = masked_cost_volume(target, reference, mask)
    expected = F.cosine_similarity(target.unsqueeze(2), reference.unsqueeze(1), dim=-1)
    torch.testing.assert_close(cost[0, 3:9], expected[0, 3:9])
    assert torch.equal(cost[0, :3], torch.zeros(3, 16)) and torch.equal(cost[0, 9:], torch.zeros(7, 16))
    changed = target.clone()
    changed[0, :3] += 5 * torch.randn(3, 6, generator=generator)
    changed[0, 9:] = torch.randn(7, 6, generator=generator)
    assert torch.equal(masked_cost_volume(changed, reference, mask), cost)
    # inside the mask the argmax finds where each target feature went in the reference
    flow = correspondence(cost)[0, 3:9]
    assert torch.allclose(reference[0, flow], target[0, 3:9], atol=0.1)


def test_foreground_masks_are_disjoint_and_skip_unnamed_concepts():
    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(2, 2, 4, 4, generator=generator)
    valid = torch.tensor([[True, True], [True, False]])
    masks = foreground_masks(maps, valid, threshold=0.3)
    assert masks.shape == (2, 2, 16) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.sum(dim=1) <= 1).all() and masks[1, 1].sum() == 0 and masks.sum() > 0


# ------------------------------------------------------------------------------ layout guidance (Eq. 10)
def test_layout_loss_is_zero_at_first_step_maps_and_positive_elsewhere():
    generator = torch.Generator().manual_seed(4)
    maps = torch.rand(2, 2, 8, 8, generator=generator)
    valid = torch.ones(2, 2, dtype=torch.bool)
    assert float(layout_loss(maps, maps, valid)) == pytest.approx(0.0, abs=1e-7)
    assert float(layout_loss(maps.flip(-1), maps, valid)) > 0.1
    assert float(layout_loss(maps.flip(-1), maps, torch.zeros_like(valid))) == 0.0
    refined = refine_maps(torch.tensor([0.2, 0.55, 0.6, 1.0]))  # M-λ, M-λ, M+λ, M+λ then shifted by (x+λ)/(1+2λ)
    torch.testing.assert_close(refined, torch.tensor([0.1, 0.275, 0.8, 1.0]))
    assert step_size(0, 50) == 10.0 and step_size(25, 50) == 5.0


def test_layout_gradient_moves_the_latent_and_lowers_the_loss(concept_pipeline):
    unet = concept_pipeline.unet
    controller = attention_controller_of(unet)
    prompts = ["a <dog> and a <cat>"]
    valid = named_concepts(prompts, CONCEPTS)
    positions = concept_token_positions(prompts, concept_pipeline.tokenizer, CONCEPTS, valid)
    from conceptflow.adapters.tokens import encode_layerwise

    with torch.no_grad():
        text = encode_layerwise(prompts, concept_pipeline.tokenizer, concept_pipeline.text_encoder,
                                controller.n_cross_layers, CONCEPTS)
    layers = layout_layer_names(controller.layers, "mid_block")
    guidance = LayoutGuidance(unet, controller, layers, positions, valid, steps=10, initial_step_size=0.5)
    generator = torch.Generator().manual_seed(5)
    first, latents = torch.randn(2, 1, 4, 16, 16, generator=generator)
    timestep = torch.tensor(500)
    with torch.no_grad():
        recorder = CrossAttentionMapRecorder(positions, layers)
        with controller.use(recorder):
            unet(first, timestep, encoder_hidden_states=text)
        guidance.set_initial_maps(guidance.concept_maps([recorder.maps[name] for name in layers]))
        assert float(guidance.loss(first, timestep, text)) == pytest.approx(0.0, abs=1e-6)
        before = float(guidance.loss(latents, timestep, text))
    moved = guidance(latents, timestep, text, step_index=1)
    assert not torch.equal(moved, latents)
    with torch.no_grad():
        assert float(guidance.loss(moved, timestep, text)) < before


def test_truncated_gradient_pass_stops_after_the_last_read_layer_and_keeps_the_gradient(concept_pipeline):
    unet = concept_pipeline.unet
    controller = attention_controller_of(unet)
    layers = layout_layer_names(controller.layers, "mid_block")
    assert layers and all(not name.startswith("up_blocks") for name in layers)
    positions = torch.tensor([[1, 2, 3, 4]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    generator = torch.Generator().manual_seed(6)
    text = torch.randn(1, 77, 32, generator=generator)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    timestep = torch.tensor(300)
    guidance = LayoutGuidance(unet, controller, layers, positions, valid, steps=10)
    guidance.set_initial_maps(torch.rand(1, 2, 16, 16, generator=generator))

    seen = []

    class Spy(CrossAttentionMapRecorder):
        def edit_key_value(self, layer, query, key, value, context):
            seen.append(layer.name)
            return key, value

    with controller.use(Spy(positions, [])):
        variable = latents.clone().requires_grad_(True)
        truncated = torch.autograd.grad(guidance.loss(variable, timestep, text), variable)[0]
    assert seen and not any(name.startswith("up_blocks") for name in seen)
    full_recorder = CrossAttentionMapRecorder(positions, layers, keep_graph=True)
    variable = latents.clone().requires_grad_(True)
    with controller.use(full_recorder):
        unet(variable, timestep, encoder_hidden_states=text)
    loss = layout_loss(guidance.concept_maps([full_recorder.maps[name] for name in layers]),
                       guidance.initial_maps, valid)
    torch.testing.assert_close(truncated, torch.autograd.grad(loss, variable)[0])


# ---------------------------------------------------------------------------------------- the sampler
def test_reference_branches_are_shared_per_concept_and_seed():
    prompts = ["a <dog> and a <cat>", "a <cat> by a <dog>", "a <dog> alone", "a <dog> and a <cat>"]
    seeds = [0, 0, 1, 1]
    valid = named_concepts(prompts, CONCEPTS)
    assert valid.tolist() == [[True, True], [True, True], [True, False], [True, True]]
    keys, layout = plan_references(seeds, valid, CONCEPTS, reference_seed=None)
    assert keys == [("dog", 0), ("cat", 0), ("dog", 1), ("cat", 1)]
    assert layout.reference_index.tolist() == [[0, 1], [0, 1], [2, 0], [2, 3]]
    keys, layout = plan_references(seeds, valid, CONCEPTS, reference_seed=7)
    assert keys == [("dog", 7), ("cat", 7)] and layout.n_rows == 6
    assert layout.target_rows(1) == slice(8, 12) and layout.reference_rows(1).tolist()[2] == [6, 6]


def test_both_off_reproduces_fused_sampling_bit_for_bit(concept_pipeline):
    requests = [SampleRequest("a <dog> and a <cat>", 3), SampleRequest("a <cat> on grass", 4),
                SampleRequest("a <dog> and a <cat>", 5)]
    plain = sample_images(concept_pipeline, requests, CONCEPTS, 64, steps=3, batch_size=2)
    ours = sample_conceptflow_m(concept_pipeline, requests, CONCEPTS, 64,
                                settings(3, sama=False, layout_guidance=False, batch_size=2), attention_maps=False).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, plain))


def test_sama_with_the_reference_prompt_as_target_changes_nothing(concept_pipeline):
    """Target = reference (same prompt and seed): identity correspondence, so Eq. 8 gives V^trg."""
    requests = [SampleRequest("a photo of a <dog>", 11)]
    core = SamplingCore(concept_pipeline)
    with_sama = ConceptFlowMBatch(core, requests, CONCEPTS, 64,
                                  settings(6, layout_guidance=False, sama_start_step=2, reference_seed=None),
                                  want_maps=False)
    applied = []
    original = with_sama.sama.edit_key_value

    def spy(layer, query, key, value, context):
        edited_key, edited = original(layer, query, key, value, context)
        applied.append(edited is not value)
        return edited_key, edited

    with_sama.sama.edit_key_value = spy
    latents = with_sama.run()
    without = ConceptFlowMBatch(core, requests, CONCEPTS, 64,
                                settings(6, sama=False, layout_guidance=False), want_maps=False).run()
    assert sum(applied) == 4 * 3  # steps 2..5, mid + two decoder self-attention layers
    torch.testing.assert_close(latents, without, rtol=1e-4, atol=1e-3)


def test_full_sampler_on_tiny_base(concept_pipeline):
    requests = [SampleRequest("a <dog> and a <cat>", 0), SampleRequest("a <dog> on the beach", 1),
                SampleRequest("a <cat> next to a <dog>", 0)]
    core = SamplingCore(concept_pipeline)
    result = SAMPLERS["conceptflow_m"].sample(core, requests, CONCEPTS, 64, settings(5, sama_start_step=3))
    assert [image.size for image in result.images] == [(64, 64)] * 3
    assert [sorted(maps) for maps in result.attention_maps] == [["cat", "dog"], ["dog"], ["cat", "dog"]]
    for maps in result.attention_maps:
        for array in maps.values():
            assert array.shape == (16, 16) and array.min() == 0.0 and array.max() == pytest.approx(1.0)
    plain_latents = ConceptFlowMBatch(core, requests, CONCEPTS, 64,
                                      settings(5, sama=False, layout_guidance=False), want_maps=False).run()
    plain = core.decode(plain_latents)
    # the registry's entry point also returns the plain fused images of the same requests
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.plain_images, plain))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, plain))
    # each component alone changes the targets (SAMA's references differ from them)
    for sama, layout_guidance in [(True, False), (False, True)]:
        latents = ConceptFlowMBatch(core, requests, CONCEPTS, 64,
                                    settings(5, sama, layout_guidance, sama_start_step=3), want_maps=False).run()
        assert (latents - plain_latents).abs().amax() > 1e-3


def test_conceptflow_m_defaults_follow_the_paper():
    config = GenerateConfig(sampler="conceptflow_m")
    assert config.steps == 50 and GenerateConfig().steps == 20 and GenerateConfig(sampler="conceptflow_m", steps=7).steps == 7
    m = config.conceptflow_m
    assert (m.sama, m.layout_guidance, m.sama_start_step) == (True, True, 4)
    assert (m.layout_threshold, m.layout_adjustment, m.layout_step_size) == (0.55, 0.5, 10.0)
