"""Cones 2 residual embeddings (``train.method: cones2``) on the tiny base.

Checked: the loss is the denoising MSE plus r1·‖e₀ − e₀*‖ + r2·‖e_rest − e*_rest‖ (hand-computed);
the saved residual added to the base encoder's output at the class word gives exactly the tuned
encoder's output there; gradients reach every text-encoder parameter and nothing else; resume =
uninterrupted; the saved concept is the residual alone (a few KB); ``<name>`` becomes the class
word while the concept is applied; two such concepts of one class word are refused (catalog and
apply time); a catalog trains it by naming the method, fuses it (average) with an ED-LoRA concept
and generates with the fused sampler, the residual acting in the generated images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conceptflow.adapters.branched import runtime_concepts
from conceptflow.adapters.concept_io import read_adapter, save_adapter
from conceptflow.adapters.effects import ConceptEffects, TextResidual
from conceptflow.adapters.tokens import encode_layerwise, prompt_words
from conceptflow.errors import ConceptflowError
from conceptflow.methods import METHODS, get_method, read_concept
from conceptflow.methods.cones2.config import Cones2TrainConfig
from conceptflow.methods.cones2.residual import (
    RESIDUAL_TEMPLATES,
    embedding_regulariser,
    mean_residual,
    outputs_at_word,
)
from conceptflow.models.loading import load_base_pipeline
from conceptflow.train.common import prepare_concept_training, sample_batch
from conceptflow.train.loop import run_training

PAIR = ("zigzag_star", "quartered_heart")  # the first is trained with cones2, the second with ED-LoRA


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cones2_photos")
    paths = []
    for index in range(2):
        array = np.full((64, 64, 3), 230, np.uint8)
        array[16:48, 12 + 4 * index: 44 + 4 * index] = (200, 40, 60)
        paths.append(folder / f"{index}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def build(photos, pipeline=None, class_word="box", **config):
    torch.manual_seed(0)
    pipeline = pipeline or load_base_pipeline("embedded:tiny-sd")
    setup = prepare_concept_training(pipeline, "toy", class_word, photos, None, 64, seed=0)
    return setup, get_method("cones2").build_trainer(setup, Cones2TrainConfig(**config))


def perturb_text_encoder(text_encoder, seed: int = 3) -> None:
    """Move every text-encoder weight off the base (a stand-in for training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in text_encoder.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def test_defaults_are_the_references_and_the_method_is_registered():
    config = Cones2TrainConfig()
    assert (config.lr_text_encoder, config.bos_weight, config.rest_weight, config.weight_decay) == (5e-6, 5e-3, 5e-4, 1e-2)
    assert (config.steps, config.batch_size, config.masked_loss, config.pad_prompts) == (4000, 1, False, False)
    assert len(RESIDUAL_TEMPLATES) == 27 and RESIDUAL_TEMPLATES[0] == "a photo of a {}"
    assert METHODS["cones2"].config is Cones2TrainConfig and Cones2TrainConfig.written_as_class_word


def test_regulariser_is_the_hand_computed_norms():
    hidden = torch.zeros(4, 2)
    target = torch.tensor([[3.0, 4.0], [9.0, 9.0], [1.0, 2.0], [2.0, 4.0]])
    # BOS row: ||(3, 4)|| = 5; row 1 (the word) is not regularised; rows 2-3: sqrt(1 + 4 + 4 + 16) = 5
    value = embedding_regulariser(hidden, target, word_position=1, bos_weight=0.1, rest_weight=0.01)
    assert value.item() == pytest.approx(0.1 * 5 + 0.01 * 5)
    assert embedding_regulariser(target, target, 1, 0.1, 0.01).item() == 0.0


def test_loss_is_mse_plus_the_regulariser_of_bos_and_the_rows_after_the_word(photos):
    setup, method = build(photos, bos_weight=0.3, rest_weight=0.07, batch_size=2)
    ids = method.train_ids
    assert ids.shape == (1, 77) and method.word_position == 1  # <bos> box <eos> <pad>...
    with torch.no_grad():
        base = setup.text_encoder(ids)[0][0].clone()
    perturb_text_encoder(setup.text_encoder)
    loss, logs = method.loss(0, torch.Generator().manual_seed(5))

    batch = sample_batch(setup, 2, torch.Generator().manual_seed(5))
    with torch.no_grad():
        tuned = setup.text_encoder(ids)[0]
        prediction = setup.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=tuned.expand(2, -1, -1)).sample
    mse = ((prediction - batch.noise) ** 2).mean()
    e = tuned[0]
    expected = mse + 0.3 * (e[0] - base[0]).pow(2).sum().sqrt() + 0.07 * (e[2:] - base[2:]).pow(2).sum().sqrt()
    assert logs["regulariser"] > 0
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_pad_prompts_trains_on_the_prompt_length_and_leaves_the_residual_alone(photos):
    setup, method = build(photos, pad_prompts=True)
    assert method.train_ids.shape == (1, 3)  # <bos> box <eos>: e_rest is the EOS alone
    perturb_text_encoder(setup.text_encoder)
    padded = outputs_at_word(setup.text_encoder, setup.tokenizer, "box", RESIDUAL_TEMPLATES, pad_prompts=False)
    unpadded = outputs_at_word(setup.text_encoder, setup.tokenizer, "box", RESIDUAL_TEMPLATES, pad_prompts=True)
    torch.testing.assert_close(unpadded, padded, rtol=1e-5, atol=1e-5)  # causal attention: padding-blind (to rounding)


def test_gradients_reach_every_text_encoder_parameter_and_nothing_else(photos):
    setup, method = build(photos)
    loss, _ = method.loss(0, torch.Generator().manual_seed(0))
    loss.backward()
    groups = method.parameter_groups()
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(5e-6, 1e-2)]
    trained = {id(p) for p in groups[0]["params"]}
    assert trained == {id(p) for p in setup.text_encoder.parameters()}
    for name, parameter in setup.text_encoder.named_parameters():
        assert parameter.grad is not None, name
    assert setup.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    for model in (setup.unet, setup.pipeline.vae):
        assert all(p.grad is None for p in model.parameters())
    assert setup.embeddings.weight.grad is None and not setup.embeddings.weight.requires_grad


def test_residual_plus_base_output_is_the_tuned_output_at_the_class_word(photos):
    setup, method = build(photos)
    base_pipeline = load_base_pipeline("embedded:tiny-sd")
    perturb_text_encoder(setup.text_encoder)
    tuned, base = setup.text_encoder, base_pipeline.text_encoder

    # the saved residual is the mean over the 27 templates of (tuned - base) at the word
    saved, meta = method.export()
    per_template = [outputs_at_word(tuned, setup.tokenizer, "box", (t,))[0] - outputs_at_word(base, setup.tokenizer, "box", (t,))[0]
                    for t in RESIDUAL_TEMPLATES]
    torch.testing.assert_close(saved["text_residual"], torch.stack(per_template).mean(0), rtol=1e-5, atol=1e-6)
    assert set(saved) == {"text_residual"} and meta["prompt_word"] == "box"

    # one template: base + residual (applied at run time) is the tuned encoder's output at the word
    template = "a photo of a {}"
    residual = mean_residual(outputs_at_word(tuned, setup.tokenizer, "box", (template,)),
                             outputs_at_word(base, setup.tokenizer, "box", (template,)))
    concept = ConceptEffects({"name": "toy", "method": "cones2"}, text_residuals=[TextResidual("box", residual)])
    ids = base_pipeline.tokenizer(template.format("box"), padding="max_length", return_tensors="pt").input_ids
    position = ids[0].tolist().index(base_pipeline.tokenizer("box", add_special_tokens=False).input_ids[0])
    with torch.no_grad():
        plain = base(ids)[0][0]
        with runtime_concepts(base_pipeline, [concept]):
            applied = base(ids)[0][0]
        expected = tuned(ids)[0][0]
    torch.testing.assert_close(applied[position], expected[position], rtol=0, atol=1e-6)
    assert not torch.allclose(plain[position], expected[position], atol=1e-3)
    others = [i for i in range(ids.shape[1]) if i != position]
    assert torch.equal(applied[others], plain[others])  # only the word's row changes


def test_saved_concept_is_the_residual_alone_and_name_becomes_the_class_word(photos, tmp_path):
    setup, method = build(photos)
    perturb_text_encoder(setup.text_encoder)
    tensors, meta = method.export()
    folder = save_adapter(tmp_path / "concept", tensors, {"kind": "concept", "name": "toy", "method": "cones2",
                                                          "class_word": "box", **meta})
    stored, _ = read_adapter(folder)
    assert set(stored) == {"text_residual"} and stored["text_residual"].shape == (32,)
    size = (folder / "adapter.safetensors").stat().st_size
    assert size < 2048  # 32 floats + header here; SD1.5's 768 floats make 3 KB

    pipeline = load_base_pipeline("embedded:tiny-sd")
    concept = read_concept(folder, pipeline)
    assert not concept.mergeable and not concept.embeddings
    (residual,) = concept.text_residuals
    assert residual.token == "box" and torch.equal(residual.vector, tensors["text_residual"])
    prompt = "a photo of <toy> on a table"
    n_layers = 2
    with torch.no_grad():
        plain = encode_layerwise(["a photo of box on a table"], pipeline.tokenizer, pipeline.text_encoder, n_layers)
        with runtime_concepts(pipeline, [concept]):
            assert prompt_words(pipeline.tokenizer) == {"toy": "box"}
            applied = encode_layerwise([prompt], pipeline.tokenizer, pipeline.text_encoder, n_layers, ["toy"])
    assert prompt_words(pipeline.tokenizer) == {}  # restored on exit
    position = 4  # <bos> a photo of box
    torch.testing.assert_close(applied[0, :, position], plain[0, :, position] + residual.vector, rtol=0, atol=1e-6)
    assert torch.equal(applied[0, :, :position], plain[0, :, :position])
    with pytest.raises(ConceptflowError, match="not a loaded concept"):  # known only while applied
        encode_layerwise([prompt], pipeline.tokenizer, pipeline.text_encoder, n_layers, [])


def test_two_concepts_of_one_class_word_are_refused(tiny_pipeline, tmp_path):
    hidden = tiny_pipeline.text_encoder.config.hidden_size
    first, second = (ConceptEffects({"name": name, "method": "cones2", "prompt_word": "dog"},
                                    text_residuals=[TextResidual("dog", torch.ones(hidden))]) for name in ("rex", "fido"))
    with pytest.raises(ConceptflowError, match="'rex' and 'fido' are both written as the word 'dog'"):
        with runtime_concepts(tiny_pipeline, [first, second]):
            pass
    assert prompt_words(tiny_pipeline.tokenizer) == {}

    from conceptflow.config import load_catalog
    from conceptflow.toy.concepts import write_toy_catalog

    path = write_toy_catalog(tmp_path, ["zigzag_star", "split_star"], images_per_concept=1, train_steps=1,
                             combinations={"stars": ("zigzag_star", "split_star")})
    raw = yaml.safe_load(path.read_text())
    for name in ("zigzag_star", "split_star"):
        raw["concepts"][name]["train"]["method"] = "cones2"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(Exception, match=r"\['zigzag_star', 'split_star'\] that are all written as their class word 'star'"):
        load_catalog(path)
    raw["concepts"]["split_star"]["train"]["method"] = "edlora"  # an ED-LoRA star has its own tokens: fine
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_catalog(path)


def test_multi_token_class_word_is_refused(photos):
    with pytest.raises(ConceptflowError, match="'teddy bear' splits into 2 tokens"):
        build(photos, class_word="teddy bear")


def test_resume_reproduces_uninterrupted_run(photos, tmp_path):
    _, uninterrupted = build(photos, lr_text_encoder=1e-3)
    initial = {k: v.clone() for k, v in uninterrupted.trainable_state().items()}
    run_training(uninterrupted, 4, 0, tmp_path / "a", "key", checkpoint_every=2, log_every=1)
    expected = uninterrupted.trainable_state()
    assert not torch.equal(expected["text_encoder.text_model.final_layer_norm.weight"],
                           initial["text_encoder.text_model.final_layer_norm.weight"])

    _, killed = build(photos, lr_text_encoder=1e-3)
    run_training(killed, 4, 0, tmp_path / "b", "key", checkpoint_every=1, log_every=1, stop_after=2)
    _, resumed = build(photos, lr_text_encoder=1e-3)
    history = run_training(resumed, 4, 0, tmp_path / "b", "key", checkpoint_every=1, log_every=1)
    assert [row["step"] for row in history] == [3, 4]
    actual = resumed.trainable_state()
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    torch.testing.assert_close(resumed.export()[0]["text_residual"], uninterrupted.export()[0]["text_residual"],
                               rtol=0, atol=0)


@pytest.fixture(scope="module")
def cones2_project(tmp_path_factory, one_torch_thread):
    from conceptflow.config import load_catalog
    from conceptflow.stages.fuse import fuse
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.stages.train import train
    from conceptflow.toy.concepts import write_toy_catalog

    root = tmp_path_factory.mktemp("cones2_project")
    path = write_toy_catalog(root, list(PAIR), images_per_concept=2, train_steps=2, prompt_seeds=(0,))
    raw = yaml.safe_load(path.read_text())
    raw["concepts"][PAIR[0]]["train"]["method"] = "cones2"  # the one-line change
    raw["concepts"][PAIR[0]]["train"]["lr_text_encoder"] = 1e-3  # 2 steps at 5e-6 would leave ~0 to see
    raw["fuse"] = {"method": "average"}
    raw["generate"] = {"sampler": "fused", "steps": 2, "batch_size": 2}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    catalog = load_catalog(path)
    for name in PAIR:
        ingest(catalog, name)
        mask(catalog, name)
        train(catalog, name)
    combination = catalog.combinations[0].name
    fuse(catalog, combination)
    return catalog, combination


def test_catalog_trains_fuses_and_generates_a_cones2_concept_beside_an_edlora_one(cones2_project):
    from conceptflow.layout import Layout
    from conceptflow.sample.core import SampleRequest
    from conceptflow.stages.combination_model import CombinationModel
    from conceptflow.sample.fused import sample_images
    from conceptflow.stages.generate import generate

    catalog, combination = cones2_project
    layout = Layout(catalog)
    adapter = layout.adapter(PAIR[0])
    tensors, meta = read_adapter(adapter)
    assert meta["method"] == "cones2" and meta["class_word"] == "star" and meta["prompt_word"] == "star"
    assert set(tensors) == {"text_residual"} and float(tensors["text_residual"].norm()) > 0
    assert (adapter / "adapter.safetensors").stat().st_size < 2048

    fused_tensors, fused_meta = read_adapter(layout.fused(combination))
    (part,) = fused_meta["runtime_parts"]
    assert part["name"] == PAIR[0] and part["text_residuals"] == ["star"] and part["prompt_word"] == "star"
    assert torch.equal(fused_tensors["runtime.0.text_residual.0"], tensors["text_residual"])
    assert any(key.startswith("weight.unet.") for key in fused_tensors)  # the ED-LoRA concept's fused weights

    generate(catalog, combination)
    rows = yaml.safe_load((layout.generated(combination) / "images.json").read_text())["images"]
    assert len(rows) == len(catalog.combinations[0].prompts)

    # In the generate stage's model, <zigzag_star> is the word "star" plus the residual there ...
    model = CombinationModel(catalog, combination, "fused")
    prompt = rows[0]["prompt"]  # "a <zigzag_star> and a <quartered_heart>"
    class_prompt = prompt.replace(f"<{PAIR[0]}>", "star")
    with model._parts():
        text = model.core.encode([prompt], list(PAIR))
    plain = model.core.encode([class_prompt], list(PAIR))
    position = 2  # <bos> a star
    torch.testing.assert_close(text[0, :, position], plain[0, :, position] + tensors["text_residual"], rtol=0, atol=1e-5)
    assert torch.equal(text[0, :, :position], plain[0, :, :position])
    with pytest.raises(ConceptflowError, match="not a loaded concept"):
        model.core.encode([prompt], [PAIR[1]])  # outside the block <zigzag_star> is nothing

    # ... and the generated image is that conditioning's, not the bare class word's
    settings = catalog.generate
    requests = [SampleRequest(row["prompt"], row["seed"]) for row in rows]  # the stage's batch
    generated = np.asarray(Image.open(layout.generated(combination) / rows[0]["file"]).convert("RGB"))
    resampled = np.asarray(model.sample(settings, requests).images[0])
    requests = [SampleRequest(r.prompt.replace(f"<{PAIR[0]}>", "star"), r.seed) for r in requests]
    without = np.asarray(sample_images(model.core, requests, list(PAIR), catalog.resolution, settings.steps,
                                       settings.guidance_scale, settings.batch_size)[0])
    assert np.array_equal(generated, resampled)
    assert not np.array_equal(generated, without)


def test_cones2_layout_sampler_places_the_cones2_concept_at_its_class_word(cones2_project):
    """The Cones 2 layout guidance finds a cones2 concept's token at its class word (both of the
    two slots a concept has in the samplers' position tables)."""
    from conceptflow.layout import Layout
    from conceptflow.sample.conceptflow_m.pipeline import concept_token_positions, named_concepts
    from conceptflow.stages.combination_model import CombinationModel
    from conceptflow.stages.generate import generate

    catalog, combination = cones2_project
    prompt = catalog.combinations[0].prompts[0]  # "a <zigzag_star> and a <quartered_heart>"
    model = CombinationModel(catalog, combination, "fused")
    tokenizer = model.core.pipeline.tokenizer
    with model._parts():
        positions = concept_token_positions([prompt], tokenizer, list(PAIR), named_concepts([prompt], list(PAIR)))
    assert positions.tolist() == [[2, 2, 5, 6]]  # <bos> a star and a <quartered_heart1> <quartered_heart2>

    settings = {"sampler": "cones2_layout", "steps": 2, "batch_size": 2, "cones2_layout": {"pad_prompts": True}}
    catalog = catalog.model_copy(update={"generate": type(catalog.generate).model_validate(settings)})
    generate(catalog, combination, sampler="cones2_layout", force=True)
    listing = yaml.safe_load((Layout(catalog).generated(combination) / "images.json").read_text())
    assert listing["sampler"] == "cones2_layout" and len(listing["images"]) == len(catalog.combinations[0].prompts)


def test_gradient_fusion_captures_a_cones2_concept_at_its_class_word_with_its_residual(cones2_project):
    """Gradient fusion keeps each concept's layers on that concept's own inputs: for a cones2
    concept those are the class-word prompts, with its residual at the word (run last: it
    replaces the project's fused model by a gradient-fused one)."""
    from conceptflow.attention.processor import attention_controller_of
    from conceptflow.fuse.gradient import TEXT_PROMPTS, _ids, _runtime_channels, capture_cross_attention_kv, capture_text_encoder
    from conceptflow.fuse.gram import GramRecorder
    from conceptflow.layout import Layout
    from conceptflow.stages.fuse import fuse

    catalog, combination = cones2_project
    pipeline = load_base_pipeline(catalog.base_model_source)
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    concept = read_concept(Layout(catalog).adapter(PAIR[0]), pipeline)
    residual = concept.text_residuals[0].vector.double()
    star, eos = tokenizer("star", add_special_tokens=False).input_ids[0], tokenizer.eos_token_id
    cross = attention_controller_of(pipeline.unet).cross_layers[0]
    kv_path, text_path = f"unet.{cross.name}.to_k", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    with torch.no_grad():
        with _runtime_channels(pipeline, concept, 1.0):
            kv = capture_cross_attention_kv(pipeline, PAIR[0], [kv_path])[kv_path]
            text = capture_text_encoder(pipeline, PAIR[0], 2, [text_path])[text_path]
        expected_kv = 0
        for template in TEXT_PROMPTS:
            ids = _ids(tokenizer, template.format("star"))
            hidden = text_encoder(ids)[0][0].double()
            hidden[ids[0] == star] += residual
            keep = (ids[0] == star) | (ids[0] == eos)
            expected_kv = expected_kv + hidden[keep].T @ hidden[keep]
        with GramRecorder({text_path: text_encoder.get_submodule(text_path.removeprefix("text_encoder."))}) as recorder:
            for _ in range(2):
                for template in TEXT_PROMPTS:
                    text_encoder(_ids(tokenizer, template.format("star")))
    torch.testing.assert_close(kv, expected_kv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(text, recorder.grams[text_path], rtol=1e-6, atol=1e-6)
    assert prompt_words(tokenizer) == {}

    gradient = catalog.model_copy(update={"fuse": type(catalog.fuse).model_validate({"method": "gradient"})})
    manifest, ran = fuse(gradient, combination, force=True)
    assert ran
    tensors, meta = read_adapter(Layout(catalog).fused(combination))
    assert meta["method"] == "gradient" and meta["runtime_parts"][0]["prompt_word"] == "star"
