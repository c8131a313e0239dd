"""The one sampling core: its denoise equals the loops it replaced; every registered sampler runs."""

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from conceptflow.adapters.effects import ConceptEffects
from conceptflow.adapters.tokens import concept_token_strings, encode_layerwise, write_embeddings
from conceptflow.attention.processor import AttentionHook, attention_controller_of
from conceptflow.config import GenerateConfig
from conceptflow.sample import SAMPLERS, SamplingResult
from conceptflow.sample.core import SampleRequest, SamplingCore

CONCEPTS = ("dog", "cat")


@pytest.fixture
def core(tiny_pipeline, one_torch_thread):
    """A core around the tiny base with random layer-wise tokens for <dog> and <cat>."""
    core = SamplingCore(tiny_pipeline)
    generator = torch.Generator().manual_seed(0)
    write_embeddings(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder,
                     {token: torch.randn(32, generator=generator)
                      for name in CONCEPTS for token in concept_token_strings(name, core.n_layers)})
    return core


def reference_loop(pipeline, text, latents, steps, uncond=None, guidance_scale=None):
    """The loops the core replaced, written out: gradient fusion's capture (no guidance) and the
    fused sampler's (classifier-free guidance)."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            if uncond is None:
                noise = pipeline.unet(scheduler.scale_model_input(latents, timestep), timestep,
                                      encoder_hidden_states=text).sample
            else:
                model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
                noise = pipeline.unet(model_input, timestep, encoder_hidden_states=torch.cat([uncond, text])).sample
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            latents = scheduler.step(noise, timestep, latents).prev_sample
    return latents


def test_core_holds_the_one_controller_and_layer_count(core):
    assert core.controller is attention_controller_of(core.pipeline.unet)
    assert core.n_layers == len(core.controller.cross_layers) > 1
    assert SamplingCore.of(core) is core and SamplingCore.of(core.pipeline).controller is core.controller
    pipeline = core.pipeline
    prompts = ["a <dog> and a <cat>", "a <cat>"]
    with torch.no_grad():
        expected = encode_layerwise(prompts, pipeline.tokenizer, pipeline.text_encoder, core.n_layers, CONCEPTS)
    assert torch.equal(core.encode(prompts, CONCEPTS), expected)
    assert core.encode(prompts, CONCEPTS).shape[:2] == (2, core.n_layers)


def test_initial_latents_depend_on_each_images_seed_only(core):
    together = core.initial_latents([3, 4, 5], 64)
    assert together.shape == (3, 4, 16, 16)
    assert torch.equal(core.initial_latents([4], 64)[0], together[1])
    assert not torch.equal(together[0], together[1])


def test_denoise_without_guidance_is_gradient_fusions_capture_loop(core):
    text = core.encode(["a photo of a <dog>", "a <dog> in a garden"], CONCEPTS)
    latents = core.initial_latents([0, 1], 64)
    ours = core.denoise(latents, text, steps=4)
    assert torch.equal(ours, reference_loop(core.pipeline, text, latents, 4))


def test_denoise_with_guidance_is_the_fused_samplers_loop(core):
    text = core.encode(["a <dog> and a <cat>", "a <cat> on grass"], CONCEPTS)
    uncond = core.encode_uncond(2)
    latents = core.initial_latents([2, 3], 64)
    ours = core.denoise(latents, text, steps=3, uncond=uncond, guidance_scale=7.5)
    assert torch.equal(ours, reference_loop(core.pipeline, text, latents, 3, uncond, 7.5))
    with pytest.raises(ValueError, match="both"):
        core.denoise(latents, text, steps=3, uncond=uncond)


def test_guide_runs_before_every_step_and_hooks_only_inside(core):
    text = core.encode(["a <dog>"], CONCEPTS)
    latents = core.initial_latents([0], 64)
    calls, hook_calls = [], []

    class Count(AttentionHook):
        def edit_key_value(self, layer, query, key, value, context):
            hook_calls.append(layer.name)
            return key, value

    def guide(current, timestep, step_index):
        calls.append((step_index, int(timestep)))
        return current if step_index != 1 else current * 0.5

    guided = core.denoise(latents, text, steps=3, hooks=(Count(),), guide=guide)
    scheduler = core.scheduler(3, latents.device)
    assert calls == [(i, int(t)) for i, t in enumerate(scheduler.timesteps)]
    assert len(hook_calls) == 3 * len(core.controller.layers) and not core.controller.hooks
    assert not torch.equal(guided, core.denoise(latents, text, steps=3))  # the guide's latents were used


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_registered_sampler_samples_the_tiny_base(core, name):
    spec = SAMPLERS[name]
    assert spec.name == name and spec.default_steps >= 1
    assert spec.config is None or (issubclass(spec.config, BaseModel) and spec.config())  # defaults validate
    settings = GenerateConfig(sampler=name, steps=2, batch_size=2)
    requests = [SampleRequest("a <dog> and a <cat>", 0), SampleRequest("a <cat>", 1), SampleRequest("a <dog>", 2)]
    adapters = None
    if spec.uses_adapters:  # each concept as its own adapter: its tokens (already in the table) and class word
        table = core.pipeline.text_encoder.get_input_embeddings().weight.detach()
        ids = core.pipeline.tokenizer.convert_tokens_to_ids
        adapters = {name: ConceptEffects({"name": name, "method": "edlora", "class_word": name},
                                         {token: table[ids(token)].clone()
                                          for token in concept_token_strings(name, core.n_layers)})
                    for name in CONCEPTS}
    result = spec.sample(core, requests, CONCEPTS, 64, settings, f"test {name}", adapters=adapters)
    assert isinstance(result, SamplingResult)
    assert [image.size for image in result.images] == [(64, 64)] * 3
    for extra in (result.attention_maps, result.plain_images):
        assert extra is None or len(extra) == 3
    # the plain fused sampler's images of the same requests (for a uses_adapters sampler, whose
    # pipeline holds no fused model, the generate stage samples them: tests/test_combination_model.py)
    if result.plain_images is not None and not spec.uses_adapters:
        plain = SAMPLERS["fused"].sample(core, requests, CONCEPTS, 64, settings).images
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.plain_images, plain))


def test_generate_config_steps_default_to_the_registry():
    for name, spec in SAMPLERS.items():
        assert GenerateConfig(sampler=name).steps == spec.default_steps
