"""ConceptSplit ToVA (``train.method: tova``): a value LoRA added only at the concept token's rows.

Checked on the tiny base: the update is exactly zero at every other text token and equals
alpha·B·A·c at the token's rows; gradients reach only the LoRA; the saved concept's run-time
token deltas reproduce the training forward; two ToVA concepts in one prompt equal each alone at
their own tokens (and add exactly in a cross-attention output); resume = uninterrupted; a catalog
trains it through the train stage by naming the method.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import ValidationError

from conceptflow.adapters.branched import runtime_concepts
from conceptflow.adapters.concept_io import read_adapter, save_adapter
from conceptflow.adapters.tokens import encode_layerwise
from conceptflow.attention.processor import AttentionHook, attention_controller_of
from conceptflow.methods import get_method, read_concept
from conceptflow.methods.tova.config import ToVATrainConfig
from conceptflow.methods.tova.prompts import PROMPT_TEMPLATES
from conceptflow.methods.tova.token_lora import TokenLoRAHook, token_mask
from conceptflow.models.loading import load_base_pipeline
from conceptflow.train.common import prepare_concept_training
from conceptflow.train.loop import run_training


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tova_photos")
    paths = []
    for index in range(2):
        array = np.full((64, 64, 3), 230, np.uint8)
        array[16:48, 12 + 4 * index: 44 + 4 * index] = (200, 40, 60)
        paths.append(folder / f"{index}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def build(photos, name="toy", class_word="box", pipeline=None, captions=None, **config):
    torch.manual_seed(0)
    pipeline = pipeline or load_base_pipeline("embedded:tiny-sd")
    setup = prepare_concept_training(pipeline, name, class_word, photos, None, 64, seed=0, captions=captions)
    return setup, get_method("tova").build_trainer(setup, ToVATrainConfig(**config))


def randomise_lora(method, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in method.lora.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (0.3 if "lora_B" in name else 1.0))


class ValueRecorder(AttentionHook):
    """Keys and values of every cross-attention layer as attention uses them, and its outputs."""

    def __init__(self):
        self.keys, self.values, self.outputs = {}, {}, {}

    def edit_key_value(self, layer, query, key, value, context):
        if layer.is_cross:
            self.keys[layer.name], self.values[layer.name] = key.detach().clone(), value.detach().clone()
        return key, value

    def on_output(self, layer, hidden_states):
        if layer.is_cross:
            self.outputs[layer.name] = hidden_states.detach().clone()
        return hidden_states


def unet_inputs(batch=1):
    latents = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return latents, torch.tensor([500] * batch)


def as_rows(per_head: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, d) -> (B, T, heads * d), the projection's output rows."""
    batch, heads, tokens, head_dim = per_head.shape
    return per_head.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def test_defaults_are_the_reference_and_targets_are_text_token_projections():
    config = ToVATrainConfig()
    assert (config.rank, config.alpha, config.lr_lora, config.steps, config.batch_size) == (32, 1.0, 5e-4, 300, 1)
    assert config.targets == ("to_v",) and config.prompt_regularisation and not config.train_embeddings
    assert ToVATrainConfig(targets=["to_v", "to_k"]).targets == ("to_v", "to_k")
    for bad in (["to_q"], ["to_out.0"], [], ["to_v", "to_v"]):
        with pytest.raises(ValidationError):
            ToVATrainConfig(targets=bad)
    assert len(PROMPT_TEMPLATES) == 200 and len(set(PROMPT_TEMPLATES)) == 200
    assert all(template.count("{}") == 1 for template in PROMPT_TEMPLATES)


def test_token_mask_marks_each_prompts_own_positions(tiny_pipeline, photos):
    setup, _ = build(photos, pipeline=tiny_pipeline)
    # <bos> a photo of a <toy1> <toy2>: positions 5, 6; <bos> a <toy1> <toy2> on a <toy1> <toy2>: 2, 3, 6, 7
    mask = token_mask(["a photo of a <toy>", "a <toy> on a <toy>", "a photo of a box"], setup.tokenizer, "toy")
    assert mask.shape == (3, setup.tokenizer.model_max_length)
    assert [row.nonzero().flatten().tolist() for row in mask] == [[5, 6], [2, 3, 6, 7], []]


def test_update_is_exactly_zero_at_non_token_positions_and_alpha_BAc_at_the_token(tiny_pipeline, photos):
    setup, method = build(photos, pipeline=tiny_pipeline, targets=["to_v", "to_k"], alpha=0.5)
    randomise_lora(method, 3)
    prompts = ["a photo of a <toy> on a table", "a <toy> next to a cup"]
    text = setup.encode(prompts)
    mask = token_mask(prompts, setup.tokenizer, "toy")
    latents, timesteps = unet_inputs(2)
    base, tova = ValueRecorder(), ValueRecorder()
    with torch.no_grad():
        with setup.controller.use(base):
            setup.unet(latents, timesteps, encoder_hidden_states=text)
        with setup.controller.use(TokenLoRAHook(method.lora, mask), tova):
            setup.unet(latents, timesteps, encoder_hidden_states=text)
    assert len(tova.values) == setup.n_layers == 7
    for layer in setup.controller.cross_layers:
        pairs = method.lora.at(layer.name)
        context = text[:, layer.cross_index]
        for target, recorded, reference in (("to_v", tova.values, base.values), ("to_k", tova.keys, base.keys)):
            delta = as_rows(recorded[layer.name]) - as_rows(reference[layer.name])
            assert torch.equal(as_rows(recorded[layer.name])[~mask], as_rows(reference[layer.name])[~mask])
            pair = pairs[target]
            expected = 0.5 * context @ pair.lora_A.weight.T @ pair.lora_B.weight.T
            torch.testing.assert_close(delta[mask], expected[mask], rtol=1e-4, atol=1e-5)
            assert delta[mask].abs().min() > 0  # every token row moved


def test_gradients_reach_only_the_token_lora(tiny_pipeline, photos):
    setup, method = build(photos, pipeline=tiny_pipeline)
    groups = method.parameter_groups()
    assert [g["lr"] for g in groups] == [5e-4]
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in method.lora.parameters()} and len(trained) == 2 * 7  # A, B per to_v
    loss, logs = method.loss(0, torch.Generator().manual_seed(0))
    loss.backward()
    assert logs["token_rows"] == 2.0
    for model in (setup.unet, setup.text_encoder, setup.pipeline.vae):
        assert all(p.grad is None for p in model.parameters())
    assert setup.embeddings.weight.grad is None and not setup.embeddings.weight.requires_grad
    for name, parameter in method.lora.named_parameters():
        if "lora_B" in name:
            assert parameter.grad.abs().sum() > 0, name
        else:  # B starts at zero, so d loss / d A = alpha B^T (...) = 0 at step 0
            assert torch.equal(parameter.grad, torch.zeros_like(parameter))
    # the concept's tokens carry the class word's embedding, unchanged by training
    class_id = setup.tokenizer("box", add_special_tokens=False).input_ids[0]
    class_row = setup.text_encoder.get_input_embeddings().weight[class_id].detach()
    assert all(torch.equal(row, class_row.float()) for row in setup.embeddings.weight.detach())


def test_a_prompt_without_the_token_gives_no_gradient(tiny_pipeline, photos):
    setup, method = build(photos, pipeline=tiny_pipeline, captions=["a photo of a box", "a box on a table"])
    randomise_lora(method, 4)
    loss, logs = method.loss(0, torch.Generator().manual_seed(0))
    loss.backward()
    assert logs["token_rows"] == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in method.lora.parameters())


def test_train_embeddings_adds_the_embedding_group(tiny_pipeline, photos):
    setup, method = build(photos, pipeline=tiny_pipeline, train_embeddings=True)
    assert [g["lr"] for g in method.parameter_groups()] == [1e-3, 5e-4]
    loss, _ = method.loss(0, torch.Generator().manual_seed(0))
    loss.backward()
    assert setup.embeddings.weight.grad.abs().sum() > 0


def test_prompt_regularisation_draws_ToVA_prompts_and_keeps_captions(tiny_pipeline, photos):
    setup, method = build(photos, pipeline=tiny_pipeline, captions=[None, "a <toy> on the left"], batch_size=4)
    from conceptflow.train.common import sample_batch

    allowed = {template.format("<toy>") for template in PROMPT_TEMPLATES}
    seen = set()
    for step in range(10):
        generator = torch.Generator().manual_seed(step)
        batch = sample_batch(setup, 4, generator)
        for index, prompt in zip(batch.indices.tolist(), method.prompts(batch, generator)):
            assert prompt == "a <toy> on the left" if index == 1 else prompt in allowed
            seen.add(prompt)
    assert len(seen) > 10  # many different prompts, not the 6 shared templates
    plain = build(photos, pipeline=load_base_pipeline("embedded:tiny-sd"), prompt_regularisation=False)[1]
    batch = sample_batch(plain.setup, 4, torch.Generator().manual_seed(0))
    assert plain.prompts(batch, torch.Generator()) == batch.prompts


def save_concept(method, folder, name):
    tensors, meta = method.export()
    save_adapter(folder, tensors, {"kind": "concept", "method": "tova", "name": name, "class_word": "box",
                                   "layer_tokens": method.setup.token_strings, **meta})
    return folder


def test_saved_concept_applies_at_run_time_as_in_training(tiny_pipeline, photos, tmp_path):
    setup, method = build(photos, pipeline=tiny_pipeline, alpha=0.7)
    randomise_lora(method, 5)
    folder = save_concept(method, tmp_path / "toy", "toy")
    tensors, meta = read_adapter(folder)
    assert meta["token_paths"] == method.lora.paths and meta["targets"] == ["to_v"]
    assert all(t.dtype == torch.float32 for t in tensors.values())

    fresh = load_base_pipeline("embedded:tiny-sd")
    attention_controller_of(fresh.unet)
    concept = read_concept(folder, fresh)
    assert not concept.mergeable and not concept.deltas
    assert set(concept.token_deltas) == set(method.lora.paths)
    assert all(delta.tokens == tuple(setup.token_strings) for delta in concept.token_deltas.values())

    prompts = ["a photo of a <toy> on a table"]
    latents, timesteps = unet_inputs()
    with torch.no_grad():
        text = setup.encode(prompts)
        with setup.controller.use(TokenLoRAHook(method.lora, token_mask(prompts, setup.tokenizer, "toy"))):
            trained = setup.unet(latents, timesteps, encoder_hidden_states=text).sample
        base = setup.unet(latents, timesteps, encoder_hidden_states=text).sample
        with runtime_concepts(fresh, [concept]):
            fresh_text = encode_layerwise(prompts, fresh.tokenizer, fresh.text_encoder, setup.n_layers, ["toy"])
            applied = fresh.unet(latents, timesteps, encoder_hidden_states=fresh_text).sample
    torch.testing.assert_close(applied, trained, rtol=1e-4, atol=1e-5)
    assert (trained - base).abs().max() > 1e-3


def test_two_concepts_in_one_prompt_equal_each_alone_at_their_tokens(photos, tmp_path, tiny_sd_path):
    folders = {}
    for seed, name in ((6, "red"), (7, "blue")):
        _, method = build(photos, name=name)
        randomise_lora(method, seed)
        folders[name] = save_concept(method, tmp_path / name, name)
    pipeline = load_base_pipeline("embedded:tiny-sd")
    controller = attention_controller_of(pipeline.unet)
    red, blue = (read_concept(folders[name], pipeline) for name in ("red", "blue"))
    tokens_only = {name: dataclasses.replace(c, token_deltas={}) for name, c in (("red", red), ("blue", blue))}
    runs = {"base": [tokens_only["red"], tokens_only["blue"]], "red": [red, tokens_only["blue"]],
            "blue": [tokens_only["red"], blue], "both": [red, blue]}
    prompt = "a photo of a <red> next to a <blue>"
    latents, timesteps = unet_inputs()
    recorded = {}
    for run, concepts in runs.items():
        recorder = ValueRecorder()
        with torch.no_grad(), runtime_concepts(pipeline, concepts), controller.use(recorder):
            text = encode_layerwise([prompt], pipeline.tokenizer, pipeline.text_encoder, controller.n_cross_layers,
                                    ["red", "blue"])
            pipeline.unet(latents, timesteps, encoder_hidden_states=text)
        recorded[run] = recorder
    at = {name: token_mask([prompt], pipeline.tokenizer, name)[0] for name in ("red", "blue")}
    assert at["red"].nonzero().flatten().tolist() == [5, 6] and at["blue"].nonzero().flatten().tolist() == [10, 11]
    elsewhere = ~(at["red"] | at["blue"])
    for layer in controller.cross_layers:
        values = {run: as_rows(recorder.values[layer.name])[0] for run, recorder in recorded.items()}
        assert torch.equal(values["both"][at["red"]], values["red"][at["red"]])
        assert torch.equal(values["both"][at["blue"]], values["blue"][at["blue"]])
        assert torch.equal(values["both"][elsewhere], values["base"][elsewhere])
        assert torch.equal(values["red"][at["blue"]], values["base"][at["blue"]])
        assert (values["red"][at["red"]] - values["base"][at["red"]]).abs().min() > 0
        for run in runs:  # values only: every key is the base's
            assert torch.equal(recorded[run].keys[layer.name], recorded["base"].keys[layer.name])
    # the first cross-attention layer sees the same hidden states in every run: its output
    # softmax(QK^T)·V is linear in V, so the two concepts' changes add exactly
    first = controller.cross_layers[0].name
    out = {run: recorder.outputs[first] for run, recorder in recorded.items()}
    torch.testing.assert_close(out["both"] - out["base"], (out["red"] - out["base"]) + (out["blue"] - out["base"]),
                               rtol=0, atol=1e-6)
    assert (out["red"] - out["base"]).abs().max() > 1e-4 and (out["blue"] - out["base"]).abs().max() > 1e-4


def test_resumed_training_equals_uninterrupted(photos, tmp_path, tiny_sd_path, one_torch_thread):
    _, uninterrupted = build(photos, batch_size=2)
    run_training(uninterrupted, 4, 0, tmp_path / "a", "key", checkpoint_every=2, log_every=1)
    expected = uninterrupted.trainable_state()

    _, killed = build(photos, batch_size=2)
    run_training(killed, 4, 0, tmp_path / "b", "key", checkpoint_every=1, log_every=1, stop_after=2)
    _, resumed = build(photos, batch_size=2)
    history = run_training(resumed, 4, 0, tmp_path / "b", "key", checkpoint_every=1, log_every=1)
    assert [row["step"] for row in history] == [3, 4]
    actual = resumed.trainable_state()
    assert actual.keys() == expected.keys() and len(actual) == 1 + 2 * 7
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in actual.items() if "lora_B" in k)  # it trained


def test_trains_from_a_catalog_naming_the_method(tmp_path, tiny_sd_path, one_torch_thread):
    from conceptflow.config import load_catalog
    from conceptflow.layout import Layout
    from conceptflow.stages.ingest import ingest
    from conceptflow.stages.mask import mask
    from conceptflow.stages.train import train

    folder = tmp_path / "photos" / "red"
    folder.mkdir(parents=True)
    for index in range(2):
        array = np.full((64, 64, 3), 235, np.uint8)
        array[14:50, 10 + 3 * index: 40 + 3 * index] = (220, 40, 40)
        Image.fromarray(array).save(folder / f"{index}.png")
    raw = {"base_model": "embedded:tiny-sd", "resolution": 64, "seed": 0, "mask": {"backend": "saliency"},
           "concepts": {"redbox": {"class_word": "box", "images": "photos/red",
                                   "train": {"method": "tova", "steps": 2, "checkpoint_every": 1,
                                             "lr_lora": 0.05}}}}
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw))
    catalog = load_catalog(tmp_path / "catalog.yaml")
    config = catalog.concept("redbox").train
    assert isinstance(config, ToVATrainConfig) and config.rank == 32 and config.targets == ("to_v",)
    ingest(catalog, "redbox")
    mask(catalog, "redbox")
    manifest, ran = train(catalog, "redbox")
    assert ran and manifest.md5
    adapter = Layout(catalog).adapter("redbox")
    tensors, meta = read_adapter(adapter)
    assert meta["method"] == "tova" and meta["config"]["method"] == "tova" and meta["rank"] == 32
    assert {k for k in tensors if k.startswith("embedding.")} == {f"embedding.{t}" for t in meta["layer_tokens"]}
    assert sum(k.endswith(".lora_B.weight") for k in tensors) == 7
    concept = read_concept(adapter, load_base_pipeline("embedded:tiny-sd"))
    assert len(concept.token_deltas) == 7 and all(p.endswith("attn2.to_v") for p in concept.token_deltas)
    assert any(d.delta.abs().sum() > 0 for d in concept.token_deltas.values())
    assert train(catalog, "redbox")[1] is False  # nothing changed: not retrained

    # served by itself (as a registered version is): applied at run time, and it changes the image
    from conceptflow.config import GenerateConfig
    from conceptflow.sample.core import SampleRequest
    from conceptflow.serving.generation import ServedModel
    from conceptflow.serving.spec import ServingSpec

    spec = ServingSpec(kind="concept", name="redbox", concepts=["redbox"], base_model="embedded:tiny-sd",
                       base_model_hash="", base_model_path=None, resolution=64, dtype="float32",
                       artifact_md5="", content_md5="")
    served = ServedModel(adapter, spec, "embedded:tiny-sd")
    assert [c.name for c in served.runtime] == ["redbox"]
    settings = GenerateConfig(steps=2)
    request = [SampleRequest("a photo of a <redbox>", 0)]
    image = np.asarray(served.sample(request, settings).images[0], dtype=int)
    served.runtime = [dataclasses.replace(served.runtime[0], token_deltas={})]  # its tokens, no value update
    without = np.asarray(served.sample(request, settings).images[0], dtype=int)
    assert image.shape == (64, 64, 3) and np.abs(image - without).max() > 0


def test_a_tova_and_an_edlora_concept_in_one_generated_image(photos, tmp_path, tiny_sd_path, one_torch_thread):
    from conceptflow.methods.edlora.config import LoRATrainConfig
    from conceptflow.methods.edlora.trainer import EDLoRAMethod
    from conceptflow.sample.core import SampleRequest, SamplingCore
    from conceptflow.sample.fused import sample_images

    _, tova = build(photos, name="red")
    randomise_lora(tova, 8)
    save_concept(tova, tmp_path / "red", "red")
    torch.manual_seed(0)
    ed_setup = prepare_concept_training(load_base_pipeline("embedded:tiny-sd"), "blue", "cup", photos, None, 64, seed=0)
    edlora = EDLoRAMethod(ed_setup, LoRATrainConfig())
    with torch.no_grad():
        for name, parameter in list(ed_setup.unet.named_parameters()) + list(ed_setup.text_encoder.named_parameters()):
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(9))
    tensors, meta = edlora.export()
    save_adapter(tmp_path / "blue", tensors, {"kind": "concept", "method": "edlora", "name": "blue", **meta})

    pipeline = load_base_pipeline("embedded:tiny-sd")
    core = SamplingCore(pipeline)
    controller = attention_controller_of(pipeline.unet)
    red, blue = read_concept(tmp_path / "red", pipeline), read_concept(tmp_path / "blue", pipeline)
    red_tokens_only = dataclasses.replace(red, token_deltas={})
    prompt = "a photo of a <red> next to a <blue>"
    recorded, images = {}, {}
    for run, concepts in {"blue": [red_tokens_only, blue], "both": [red, blue]}.items():
        recorder, contexts = ValueRecorder(), {}

        class Context(AttentionHook):
            def edit_key_value(self, layer, query, key, value, context):
                if layer.is_cross:
                    contexts[layer.name] = context.detach().clone()
                return key, value

        with torch.no_grad(), runtime_concepts(pipeline, concepts), controller.use(Context(), recorder):
            text = core.encode([prompt], ["red", "blue"])
            pipeline.unet(*unet_inputs(), encoder_hidden_states=text)
        with torch.no_grad(), runtime_concepts(pipeline, concepts):
            images[run] = np.asarray(sample_images(core, [SampleRequest(prompt, 0)], ["red", "blue"], 64, steps=2)[0])
        recorded[run] = (recorder, contexts)
    at_red = token_mask([prompt], pipeline.tokenizer, "red")[0]
    for layer in controller.cross_layers:
        path = f"unet.{layer.name}.to_v"
        both, ed_only = (as_rows(recorded[run][0].values[layer.name])[0] for run in ("both", "blue"))
        context = recorded["both"][1][layer.name][0]
        torch.testing.assert_close(context, recorded["blue"][1][layer.name][0], rtol=0, atol=0)
        # ED-LoRA's merged to_v acts everywhere; ToVA adds its ΔW·c at its own tokens only
        assert torch.equal(both[~at_red], ed_only[~at_red])
        torch.testing.assert_close((both - ed_only)[at_red], context[at_red] @ red.token_deltas[path].delta.T,
                                   rtol=1e-4, atol=1e-5)
    assert images["both"].shape == (64, 64, 3) and np.abs(images["both"].astype(int) - images["blue"]).max() > 0
