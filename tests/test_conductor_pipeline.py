"""Concept Conductor's sampler on the tiny base: branch prompts, batched branches against separate
merged models, switches off against plain sampling, the alignment gradient, mask partition, the
inversion cache and the registry's end-to-end run.

Concepts are random dense ΔW on every UNet attention linear and the text encoder's self-attention
(no training), with random layer-wise token embeddings and a class word.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from conceptflow.adapters.concept_io import get_linear
from conceptflow.adapters.effects import ConceptEffects
from conceptflow.adapters.merge import apply_concepts
from conceptflow.adapters.tokens import concept_token_strings
from conceptflow.attention.processor import attention_controller_of
from conceptflow.config import GenerateConfig
from conceptflow.errors import ConceptflowError
from conceptflow.sample import get_sampler
from conceptflow.sample.conductor import inversion
from conceptflow.sample.conductor.hooks import resolve_layers
from conceptflow.sample.conductor.inversion import StopForward, inversion_grid, invert_keys
from conceptflow.sample.conductor.pipeline import ConductorBatch, disjoint_boxes
from conceptflow.sample.conductor.prompts import branch_prompt
from conceptflow.sample.core import SampleRequest, SamplingCore

RESOLUTION = 64  # tiny base: 16x16 latents
ATOL = 2e-4  # branched (W0x + ΔWx) against merged ((W0 + ΔW)x) float32 rounding, carried through the steps


@pytest.fixture(scope="module")
def pipeline(tiny_sd_path, one_torch_thread):
    from conceptflow.models.loading import load_base_pipeline

    loaded = load_base_pipeline("embedded:tiny-sd")
    attention_controller_of(loaded.unet)
    return loaded


def make_concept(pipeline, name, class_word, seed, size=0.5):
    generator = torch.Generator().manual_seed(seed)
    paths = [f"unet.{n}" for n, m in pipeline.unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attn" in n]
    paths += [f"text_encoder.{n}" for n, m in pipeline.text_encoder.named_modules()
              if isinstance(m, torch.nn.Linear) and "self_attn" in n]
    deltas = {}
    for path in paths:
        weight = get_linear(pipeline, path).weight.detach()
        deltas[path] = size * weight.std() * torch.randn(weight.shape, generator=generator)
    n_layers = attention_controller_of(pipeline.unet).n_cross_layers
    embeddings = {t: torch.randn(32, generator=generator) for t in concept_token_strings(name, n_layers)}
    return ConceptEffects({"name": name, "class_word": class_word}, embeddings=embeddings, deltas=deltas)


@pytest.fixture(scope="module")
def adapters(pipeline):
    return {"dog": make_concept(pipeline, "dog", "dog", 1), "cat": make_concept(pipeline, "cat", "cat", 2)}


def settings(steps=6, batch_size=2, **conductor):
    return GenerateConfig(sampler="conductor", steps=steps, batch_size=batch_size,
                          conductor={"kmeans_inits": 2, **conductor})


REQUESTS = [SampleRequest("a <dog> and a <cat> on the beach", 0), SampleRequest("a photo of <cat> cat", 1)]


def layout_image(seed=3):
    array = np.random.default_rng(seed).integers(0, 255, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    return Image.fromarray(array)


# ------------------------------------------------------------------------------ prompts, boxes, masks
def test_branch_prompts_name_other_concepts_by_class_word():
    words = {"dog": "dog", "cat": "cat"}
    prompt = "a <dog> and a <cat> on the beach"
    assert branch_prompt(prompt, words) == "a dog and a cat on the beach"
    assert branch_prompt(prompt, words, keep="dog") == "a <dog> and a cat on the beach"
    assert branch_prompt(prompt, words, keep="cat") == "a dog and a <cat> on the beach"
    assert branch_prompt("a photo of <dog> dog", words) == "a photo of dog"
    with pytest.raises(ConceptflowError, match="no adapter"):
        branch_prompt("a <owl>", words)


def test_overlapping_boxes_go_to_the_smaller():
    boxes = torch.zeros(2, 4, 4)
    boxes[0] = 1  # the whole image
    boxes[1, :2, :2] = 1  # a corner inside it
    disjoint = disjoint_boxes(boxes)
    assert disjoint[1].sum() == 4 and disjoint[0].sum() == 12 and (disjoint.sum(0) <= 1).all()


def test_inversion_grid_subdivides_the_sampling_timesteps():
    assert inversion_grid([99, 49], 1) == [49, 99]
    assert inversion_grid([99, 49], 2) == [24, 49, 74, 99]


def test_layers_fall_back_to_the_decoder_last_block_on_a_small_base(pipeline):
    layers = attention_controller_of(pipeline.unet).layers
    alignment, mask, maps = resolve_layers(layers, "up_blocks.1.attentions.0", "up_blocks.2.attentions.2")
    assert alignment == "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert mask == "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
    assert maps == "up_blocks.1.attentions.1.transformer_blocks.0.attn2"


# ------------------------------------------------------------------------------ switches off == plain
def test_switches_off_is_plain_sampling_of_the_base_prompt(pipeline, adapters):
    core = SamplingCore(pipeline)
    batch = ConductorBatch(core, REQUESTS, adapters, RESOLUTION, settings(alignment=False, injection=False),
                           want_maps=False)
    assert batch.base_prompts == ["a dog and a cat on the beach", "a photo of cat"]
    plain = batch.plain_base()  # core.denoise of the base prompts, no adapter, no hook
    assert batch.plain and torch.equal(batch.run(), plain)
    # the branches' machinery itself (all rows in one call, adapters on the concept rows), base rows
    # equal up to batch-size-dependent float32 rounding of the batched kernels
    difference = (batch.run(force_branches=True) - plain).abs().max().item()
    assert difference < 1e-4, difference


# ------------------------------------------------------------------------------ batched == separate
class SeparateBranches(ConductorBatch):
    """Each branch through its own copy of the pipeline with its adapter merged (apply_concepts),
    concept branches first and the base last, as the reference runs them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.models = {0: copy.deepcopy(self.core.pipeline.unet)}  # without the batched branches' hooks
        for adapter_index, concepts in enumerate(self.branches[1:], start=1):
            merged = copy.deepcopy(self.core.pipeline)
            apply_concepts(merged, concepts, scale=self.config.lora_scale)
            self.models[adapter_index] = merged.unet

    def _unet(self, sample, timestep, conditioning, rows):
        n_rows, halves = len(rows), sample.shape[0] // len(rows)
        out = [None] * sample.shape[0]
        for adapter_index in sorted({row.adapter for row in rows}, key=lambda a: (a == 0, a)):
            picked = [r for r, row in enumerate(rows) if row.adapter == adapter_index]
            index = torch.tensor([h * n_rows + r for h in range(halves) for r in picked])
            unet = self.models[adapter_index]
            handles = self.hooks.install(unet)
            unet.attention_controller.hooks = self.core.controller.hooks
            self.hooks.begin_call([rows[r] for r in picked])
            try:
                result = unet(sample[index], timestep, encoder_hidden_states=conditioning[index]).sample
            except StopForward:
                result = None
            finally:
                for handle in handles:
                    handle.remove()
            if result is not None:
                for k, i in enumerate(index.tolist()):
                    out[i] = result[k]
        return None if out[0] is None else torch.stack(out)


def test_batched_branches_equal_separate_merged_models(pipeline, adapters):
    core = SamplingCore(pipeline)
    config = settings(steps=6, refine_start_fraction=0.3, refine_end_fraction=0.7, refine_every_fraction=0.2)
    images = [layout_image(3), layout_image(4)]
    batched = ConductorBatch(core, REQUESTS, adapters, RESOLUTION, config, want_maps=False, layout_images=images)
    separate = SeparateBranches(core, REQUESTS, adapters, RESOLUTION, config, want_maps=False, layout_images=images)
    ours, theirs = batched.run(), separate.run()
    assert batched.refine_steps and batched.alignment_end > 0
    difference = (ours - theirs).abs().max().item()
    assert difference < ATOL, difference
    assert (ours - batched.plain_base()).abs().max() > 100 * ATOL  # conductor changed the image
    for i in range(len(REQUESTS)):
        for side, masks in batched.hooks.masks[i].items():
            assert torch.equal(masks, separate.hooks.masks[i][side])


# ------------------------------------------------------------------------------ alignment
def test_alignment_loss_is_base_plus_mean_custom_times_weight(pipeline, adapters):
    batch = ConductorBatch(SamplingCore(pipeline), REQUESTS[:1], adapters, RESOLUTION, settings(custom_loss_weight=0.5))
    ref = torch.zeros(1, 2, 2)
    batch.hooks.keys.update({(0, 0): torch.full((1, 2, 2), 1.0), (0, 1): torch.full((1, 2, 2), 2.0),
                             (0, 2): torch.full((1, 2, 2), 4.0)})
    loss = batch.alignment_loss([{"keys": {7: ref}}], 7)
    assert loss.item() == pytest.approx(1.0 + (4.0 + 16.0) / 2 * 0.5)


def test_alignment_gradient_reaches_latents_and_reduces_the_key_mse(pipeline, adapters):
    core = SamplingCore(pipeline)
    batch = ConductorBatch(core, REQUESTS, adapters, RESOLUTION, settings(steps=6), layout_images=[layout_image(5)] * 2)
    scheduler = core.scheduler(batch.steps, pipeline.unet.device)
    reference = batch._reference(scheduler.timesteps)
    timestep = scheduler.timesteps[0]
    latents = core.initial_latents([0, 1], RESOLUTION) * scheduler.init_noise_sigma
    with batch.session():
        loss, gradient = batch.alignment_gradient(latents, timestep, scheduler, reference)
        assert torch.isfinite(gradient).all() and gradient[0].abs().sum() > 0 and gradient[1].abs().sum() > 0
        step = 0.5 * loss / gradient.pow(2).sum()  # a short step along -grad
        after, _ = batch.alignment_gradient(latents - step * gradient, timestep, scheduler, reference)
    assert after < loss


# ------------------------------------------------------------------------------ masks, inversion cache, registry
def test_refined_masks_partition_the_image(pipeline, adapters):
    core = SamplingCore(pipeline)
    config = settings(steps=8, alignment=False, masks_from_layout=False, refine_start_fraction=0.25,
                      refine_end_fraction=0.75, refine_every_fraction=0.25, overlap_threshold=0.0)
    requests = [SampleRequest("a <dog> and a <cat>", 0, boxes={"dog": (0.0, 0.0, 0.7, 1.0), "cat": (0.5, 0.0, 1.0, 1.0)})]
    batch = ConductorBatch(core, requests, adapters, RESOLUTION, config, want_maps=False)
    batch.run()
    assert len(batch.refine_steps) == 3
    assert sorted(batch.hooks.masks[0]) == [8, 16]  # the decoder's two resolutions on the tiny base
    for masks in batch.hooks.masks[0].values():
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        assert (masks.sum(0) <= 1).all()  # no position in two masks (the base keeps the rest)
    final = batch.masks()[0]
    masks = torch.stack([torch.from_numpy(final["dog"]), torch.from_numpy(final["cat"])])
    assert masks.shape == (2, 16, 16) and (masks.sum(0) <= 1).all()
    boxes = batch.boxes[0].reshape(2, 16, 16)
    assert boxes[0].sum() == 8 * 16 and boxes[1].sum() == 8 * 16  # the overlap went to the smaller (cat) box
    assert not torch.equal(masks, boxes)  # refinement moved them off the boxes


def test_initial_masks_come_from_the_layout_reference(pipeline, adapters):
    core = SamplingCore(pipeline)
    for from_layout in (True, False):
        config = settings(steps=6, alignment=False, masks_from_layout=from_layout, overlap_threshold=0.0)
        batch = ConductorBatch(core, REQUESTS[:1], adapters, RESOLUTION, config, want_maps=False,
                               layout_images=[layout_image(10)])
        reference = batch._reference(core.scheduler(6, "cpu").timesteps)
        with batch.session():
            batch._layout_masks(reference)
        masks, boxes = batch.hooks.masks[0][16], batch.boxes[0]
        assert (masks.sum(0) <= 1).all()
        assert torch.equal(masks, boxes) != from_layout


def test_inversion_is_cached_in_memory_and_on_disk(pipeline, tmp_path, monkeypatch):
    core = SamplingCore(pipeline)
    image, timesteps = layout_image(6), [999, 666, 333]
    layer = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    first = invert_keys(core, image, "a dog", timesteps, layer, RESOLUTION, cache_dir=tmp_path)
    assert sorted(first["keys"]) == [333, 666, 999] and first["keys"][999].ndim == 3  # (heads, positions, head dim)
    assert first["mask_probs"] is None
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    assert invert_keys(core, image, "a dog", timesteps, layer, RESOLUTION, cache_dir=tmp_path) is first
    monkeypatch.setattr(inversion, "_MEMORY", {})
    monkeypatch.setattr(inversion, "_invert", lambda *a, **k: pytest.fail("cache on disk was not used"))
    loaded = invert_keys(core, image, "a dog", timesteps, layer, RESOLUTION, cache_dir=tmp_path)
    assert all(torch.equal(loaded["keys"][t], first["keys"][t]) for t in timesteps)
    monkeypatch.undo()
    other = invert_keys(core, layout_image(7), "a dog", timesteps, layer, RESOLUTION, cache_dir=tmp_path)
    assert not torch.equal(other["keys"][999], first["keys"][999])
    with_probs = invert_keys(core, image, "a dog", timesteps, layer, RESOLUTION, mask_layer=layer, mask_timestep=666)
    probs = with_probs["mask_probs"]
    assert probs.shape == (256, 256) and torch.allclose(probs.sum(-1), torch.ones(256), atol=1e-5)
    for t in timesteps:  # recording probabilities runs matmul-softmax instead of SDPA there: rounding only
        torch.testing.assert_close(with_probs["keys"][t], first["keys"][t], rtol=0, atol=1e-4)


def test_ddim_inversion_of_one_step_is_the_ddim_equation(pipeline):
    """One interval, one step: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps(x0, 0), keys of the call at (x_t, t)."""
    core = SamplingCore(pipeline)
    image, layer, t = layout_image(9), "up_blocks.1.attentions.0.transformer_blocks.0.attn1", 500
    result = invert_keys(core, image, "a cat", [t], layer, RESOLUTION)
    x0 = inversion.image_latent(pipeline, image, RESOLUTION)
    text = core.encode(["a cat"])
    recorder = inversion.KeyRecorder(layer)
    a = pipeline.scheduler.alphas_cumprod[t].double()
    with torch.no_grad(), core.controller.use(recorder):
        eps = pipeline.unet(x0, torch.tensor(0), encoder_hidden_states=text).sample.double()
        x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * eps
        pipeline.unet(x_t.float(), torch.tensor(t), encoder_hidden_states=text)
    torch.testing.assert_close(result["keys"][t], recorder.keys[0], rtol=0, atol=1e-5)


def test_registry_runs_the_sampler_end_to_end(pipeline, adapters, tmp_path):
    spec = get_sampler("conductor")
    assert spec.uses_adapters
    with pytest.raises(ConceptflowError, match="adapters"):
        spec.sample(SamplingCore(pipeline), REQUESTS, ["dog", "cat"], RESOLUTION, settings())
    path = tmp_path / "layout.png"
    layout_image(8).save(path)
    requests = [REQUESTS[0], SampleRequest("a photo of <cat> cat", 1, layout_image=path)]
    result = spec.sample(SamplingCore(pipeline), requests, ["dog", "cat"], RESOLUTION, settings(), adapters=adapters,
                         cache_dir=tmp_path / "cache")
    assert spec.uses_cache and len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # one inversion per layout
    assert [image.size for image in result.images] == [(RESOLUTION, RESOLUTION)] * 2
    assert [sorted(m) for m in result.masks] == [["cat", "dog"], ["cat"]]
    assert [sorted(m) for m in result.attention_maps] == [["cat", "dog"], ["cat"]]
    assert all(v.shape == (16, 16) and 0 <= v.min() and v.max() <= 1 for m in result.attention_maps for v in m.values())
    assert len(result.plain_images) == 2
    assert result.images[0].tobytes() != result.plain_images[0].tobytes()
