"""Sampling in half precision (bfloat16 on the CPU) through the sampling core, against float32.

The tiny base (random weights, tests/conftest.py) is loaded twice, in float32 and bfloat16, with
the same concept tokens. Tolerances (measured on this base, 8 steps, 2 images, in brackets):
- plain fused sampling: mean |pixel difference| <= 2 of 255 (0.53);
- ConceptFlow-M (SAMA + layout guidance): mean |pixel difference| <= 3 of 255 (0.55);
- layout guidance's gradient at the same float32 latents: cosine similarity >= 0.98 with the
  float32 gradient (0.996), norm ratio within [0.9, 1.1] (1.009); the guide's step is float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptflow.adapters.tokens import concept_token_strings, encode_layerwise, write_embeddings
from conceptflow.attention.processor import CrossAttentionMapRecorder
from conceptflow.config import GenerateConfig
from conceptflow.models.loading import load_base_pipeline
from conceptflow.sample import SAMPLERS
from conceptflow.sample.conceptflow_m.layout_guidance import LayoutGuidance, layout_layer_names
from conceptflow.sample.conceptflow_m.pipeline import concept_token_positions, named_concepts
from conceptflow.sample.core import LATENT_DTYPE, SampleRequest, SamplingCore

CONCEPTS = ("dog", "cat")
REQUESTS = [SampleRequest("a <dog> and a <cat>", 0), SampleRequest("a <cat> next to a <dog>", 1)]
FUSED_PIXEL_TOLERANCE = 2.0
CONCEPTFLOW_M_PIXEL_TOLERANCE = 3.0
GRADIENT_COSINE = 0.98


def _core(tiny_sd_path, dtype: str) -> SamplingCore:
    torch.manual_seed(0)
    pipeline = load_base_pipeline("embedded:tiny-sd", dtype=dtype)
    core = SamplingCore(pipeline)
    generator = torch.Generator().manual_seed(0)
    write_embeddings(pipeline.tokenizer, pipeline.text_encoder,
                     {token: torch.randn(32, generator=generator)
                      for name in CONCEPTS for token in concept_token_strings(name, core.n_layers)})
    return core


@pytest.fixture(scope="module")
def cores(tiny_sd_path, one_torch_thread):
    return _core(tiny_sd_path, "float32"), _core(tiny_sd_path, "bfloat16")


def _mean_pixel_difference(images, others) -> float:
    return float(np.mean([np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean()
                          for a, b in zip(images, others)]))


def test_the_bf16_core_keeps_float32_latents_around_a_bf16_unet(cores):
    _, half = cores
    assert half.unet.dtype == torch.bfloat16 and half.pipeline.vae.dtype == torch.bfloat16
    latents = half.initial_latents([0, 1], 64)
    assert latents.dtype == LATENT_DTYPE == torch.float32
    text = half.encode(["a <dog>", "a <cat>"], CONCEPTS)
    final = half.denoise(latents, text, 3, uncond=half.encode_uncond(2), guidance_scale=7.5)
    assert final.dtype == torch.float32 and bool(torch.isfinite(final).all())


def test_bf16_fused_sampling_is_close_to_float32(cores):
    full, half = cores
    settings = GenerateConfig(sampler="fused", steps=8, batch_size=2)
    reference = SAMPLERS["fused"].sample(full, REQUESTS, CONCEPTS, 64, settings).images
    images = SAMPLERS["fused"].sample(half, REQUESTS, CONCEPTS, 64, settings).images
    difference = _mean_pixel_difference(images, reference)
    assert 0 < difference <= FUSED_PIXEL_TOLERANCE  # 0 would mean bf16 was not used


def test_bf16_conceptflow_m_is_close_to_float32(cores):
    full, half = cores
    settings = GenerateConfig(sampler="conceptflow_m", steps=8, batch_size=2, conceptflow_m={"sama_start_step": 3})
    reference = SAMPLERS["conceptflow_m"].sample(full, REQUESTS, CONCEPTS, 64, settings)
    result = SAMPLERS["conceptflow_m"].sample(half, REQUESTS, CONCEPTS, 64, settings)
    assert _mean_pixel_difference(result.images, reference.images) <= CONCEPTFLOW_M_PIXEL_TOLERANCE
    for maps in result.attention_maps:
        assert all(np.isfinite(array).all() and array.dtype == np.float32 for array in maps.values())


def _layout_gradient(core: SamplingCore, latents: torch.Tensor, first: torch.Tensor, timestep) -> torch.Tensor:
    prompts = [request.prompt for request in REQUESTS]
    valid = named_concepts(prompts, CONCEPTS)
    positions = concept_token_positions(prompts, core.pipeline.tokenizer, CONCEPTS, valid)
    with torch.no_grad():
        text = encode_layerwise(prompts, core.pipeline.tokenizer, core.pipeline.text_encoder, core.n_layers, CONCEPTS)
    layers = layout_layer_names(core.controller.layers, "mid_block")
    guidance = LayoutGuidance(core.unet, core.controller, layers, positions, valid, steps=10, initial_step_size=1.0)
    with torch.no_grad():
        recorder = CrossAttentionMapRecorder(positions, layers)
        with core.controller.use(recorder):
            core.unet(first.to(core.model_dtype), timestep, encoder_hidden_states=text)
        guidance.set_initial_maps(guidance.concept_maps([recorder.maps[name] for name in layers]))
    # the guide's own step at step_index 0 (step size 1): latents - gradient
    moved = guidance(latents, timestep, text, step_index=0)
    assert moved.dtype == torch.float32
    return latents - moved


def test_bf16_layout_guidance_gradient_matches_float32(cores):
    full, half = cores
    generator = torch.Generator().manual_seed(5)
    first, latents = torch.randn(2, 2, 4, 16, 16, generator=generator)
    timestep = torch.tensor(500)
    reference = _layout_gradient(full, latents, first, timestep)
    gradient = _layout_gradient(half, latents, first, timestep)
    assert float(reference.norm()) > 0
    cosine = torch.nn.functional.cosine_similarity(gradient.flatten(), reference.flatten(), dim=0)
    assert float(cosine) >= GRADIENT_COSINE
    ratio = float(gradient.norm() / reference.norm())
    assert 0.9 <= ratio <= 1.1
