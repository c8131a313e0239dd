"""ED-LoRA training: what it trains, exact resume, and the saved concept's round trip."""

import numpy as np
import pytest
import torch
from PIL import Image

from conceptflow.adapters.concept_io import read_adapter, save_adapter
from conceptflow.adapters.merge import apply_concepts
from conceptflow.methods import read_concept
from conceptflow.config import LoRATrainConfig
from conceptflow.train.common import prepare_concept_training
from conceptflow.methods.edlora.trainer import EDLoRAMethod
from conceptflow.train.loop import run_training


@pytest.fixture
def concept_images(tmp_path):
    paths, masks = [], []
    for index in range(3):
        array = np.zeros((64, 64, 3), np.uint8)
        array[16:48, 12 + 4 * index : 44 + 4 * index] = (220, 40, 40)
        paths.append(tmp_path / f"{index:03d}.png")
        Image.fromarray(array).save(paths[-1])
        mask = (array[..., 0] > 100).astype(np.uint8) * 255
        masks.append(tmp_path / f"m{index:03d}.png")
        Image.fromarray(mask).save(masks[-1])
    return paths, masks


def build(pipeline, concept_images, **config):
    paths, masks = concept_images
    torch.manual_seed(0)
    setup = prepare_concept_training(pipeline, "toy", "square", paths, masks, 64, seed=0)
    return setup, EDLoRAMethod(setup, LoRATrainConfig(batch_size=1, **config))


def test_gradients_reach_exactly_the_trained_parameters(tiny_pipeline, concept_images):
    setup, method = build(tiny_pipeline, concept_images, steps=1)
    loss, _ = method.loss(0, torch.Generator().manual_seed(0))
    loss.backward()
    trained = {id(p) for group in method.parameter_groups() for p in group["params"]}
    for model in (setup.unet, setup.text_encoder, setup.pipeline.vae):
        for name, parameter in model.named_parameters():
            if id(parameter) in trained:
                assert "lora_" in name
            else:
                assert parameter.grad is None, name
    lora_b = [p for n, p in setup.unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None for p in lora_b)
    assert setup.embeddings.weight.grad.abs().sum() > 0
    groups = method.parameter_groups()
    assert [g["lr"] for g in groups] == [1e-3, 1e-4, 1e-5]


def test_resume_reproduces_uninterrupted_run(tiny_pipeline, concept_images, tmp_path):
    from conceptflow.models.loading import load_base_pipeline

    _, uninterrupted = build(tiny_pipeline, concept_images)
    run_training(uninterrupted, 4, 0, tmp_path / "a", "key", checkpoint_every=2, log_every=1)
    expected = uninterrupted.trainable_state()

    _, killed = build(load_base_pipeline("embedded:tiny-sd"), concept_images)
    run_training(killed, 4, 0, tmp_path / "b", "key", checkpoint_every=1, log_every=1, stop_after=2)
    _, resumed = build(load_base_pipeline("embedded:tiny-sd"), concept_images)
    history = run_training(resumed, 4, 0, tmp_path / "b", "key", checkpoint_every=1, log_every=1)
    assert [row["step"] for row in history] == [3, 4]
    actual = resumed.trainable_state()
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_saved_concept_applies_its_merged_update(tiny_pipeline, concept_images, tmp_path):
    from conceptflow.models.loading import load_base_pipeline

    setup, method = build(tiny_pipeline, concept_images)
    with torch.no_grad():
        for name, parameter in setup.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    tensors, meta = method.export()
    save_adapter(tmp_path / "concept", tensors, {"kind": "concept", "method": "edlora", "name": "toy", **meta})
    loaded_tensors, loaded_meta = read_adapter(tmp_path / "concept")
    assert loaded_meta["rank"] == 4 and set(loaded_tensors) == set(tensors)

    fresh = load_base_pipeline("embedded:tiny-sd")
    concept = read_concept(tmp_path / "concept", fresh)
    apply_concepts(fresh, [concept], scale=1.0)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        merged = fresh.unet(latents, 10, encoder_hidden_states=text).sample
        with_lora = setup.unet(latents, 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(merged, with_lora, rtol=1e-4, atol=1e-5)
    token = setup.token_strings[0]
    torch.testing.assert_close(
        fresh.text_encoder.get_input_embeddings().weight[fresh.tokenizer.convert_tokens_to_ids(token)],
        setup.embeddings.weight[0].detach())


def test_captioned_images_train_with_their_caption_and_the_rest_with_templates(tiny_pipeline, concept_images):
    from conceptflow.train.common import PROMPT_TEMPLATES, sample_batch

    paths, masks = concept_images
    captions = [None, "a <toy> on the left, on a sand background", None]
    setup = prepare_concept_training(tiny_pipeline, "toy", "square", paths, masks, 64, seed=0, captions=captions)
    templates = {template.format("<toy>") for template in PROMPT_TEMPLATES}
    seen = set()
    for step in range(12):
        batch = sample_batch(setup, 4, torch.Generator().manual_seed(step))
        for index, prompt in zip(batch.indices.tolist(), batch.prompts):
            if index == 1:
                assert prompt == captions[1]
            else:
                assert prompt in templates
            seen.add(index)
    assert seen == {0, 1, 2}
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        prepare_concept_training(tiny_pipeline, "toy", "square", paths, masks, 64, seed=0, captions=captions[:2])
