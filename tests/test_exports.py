"""Exports load in plain diffusers as what conceptflow computes (tiny base, CPU).

* ED-LoRA → kohya LoRA (``lora_unet_``/``lora_te_``, ``lora_down``/``lora_up``/``alpha``): diffusers
  ``load_lora_weights`` gives the UNet and text encoder ``read_edlora`` + ``apply_concepts`` give;
* concept tokens → an ``emb_params`` embedding file that ``load_textual_inversion`` reads;
* a fused combination → a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads
  with the fused weights and the concepts' tokens;
* ``conceptflow export`` resolves catalog names and refuses bad names/formats with exit 2.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from conceptflow.adapters.concept_io import save_adapter
from conceptflow.adapters.embedding_files import (
    EMBEDDING_KEY,
    concept_vectors,
    layerwise_embeddings,
    read_embedding_file,
    single_embedding,
)
from conceptflow.adapters.kohya_keys import kohya_delta, kohya_name
from conceptflow.adapters.merge import apply_concepts, base_weights, fused_tensors, merged_embeddings
from conceptflow.adapters.tokens import concept_token_strings
from conceptflow.errors import ConceptflowError
from conceptflow.methods import read_concept
from conceptflow.methods.edlora.kohya import embedding_path, export_kohya
from conceptflow.methods.edlora.lora import TEXT_ATTENTION_LINEARS, UNET_ATTENTION_LINEARS, add_lora, lora_state_dict
from conceptflow.models.loading import load_base_pipeline, model_fingerprint

RANK, ALPHA = 2, 0.7  # alpha != 1 so that the alpha·rank conversion is exercised

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def n_cross_layers(pipeline) -> int:
    return sum(1 for name, _ in pipeline.unet.named_modules() if name.endswith("attn2"))


def make_edlora_concept(folder: Path, pipeline, name: str, seed: int) -> Path:
    """A concept folder as the ED-LoRA trainer saves one, with random (non-zero) LoRA and tokens."""
    generator = torch.Generator().manual_seed(seed)
    unet, text_encoder = copy.deepcopy(pipeline.unet), copy.deepcopy(pipeline.text_encoder)
    add_lora(unet, UNET_ATTENTION_LINEARS, RANK, ALPHA)
    add_lora(text_encoder, TEXT_ATTENTION_LINEARS, RANK, ALPHA)
    for model in (unet, text_encoder):
        for parameter_name, parameter in model.named_parameters():
            if "lora_" in parameter_name:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
    tensors = {f"unet.{k}": v for k, v in lora_state_dict(unet).items()}
    tensors.update({f"text_encoder.{k}": v for k, v in lora_state_dict(text_encoder).items()})
    dim = pipeline.text_encoder.get_input_embeddings().weight.shape[1]
    for token in concept_token_strings(name, n_cross_layers(pipeline)):
        tensors[f"embedding.{token}"] = torch.randn(dim, generator=generator) * 0.05
    meta = {"method": "edlora", "name": name, "class_word": "dog", "rank": RANK, "alpha": ALPHA,
            "unet_targets": list(UNET_ATTENTION_LINEARS), "text_encoder_targets": list(TEXT_ATTENTION_LINEARS),
            "base_model": "embedded:tiny-sd"}
    return save_adapter(folder, tensors, meta)


@pytest.fixture(scope="module")
def concept_folder(tmp_path_factory, tiny_sd_path):
    return make_edlora_concept(tmp_path_factory.mktemp("concept") / "dog", load_base_pipeline("embedded:tiny-sd"),
                               "dog", seed=1)


def plain_pipeline(path: Path):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --- kohya LoRA ---------------------------------------------------------------------------


def test_kohya_names_follow_the_sd1_convention():
    assert kohya_name("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert kohya_name("text_encoder", "text_model.encoder.layers.3.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    with pytest.raises(ValueError, match="text_encoder_2"):
        kohya_name("text_encoder_2", "x")


def test_kohya_file_keys_shapes_and_alpha(concept_folder, tmp_path):
    out = export_kohya(concept_folder, tmp_path / "lora" / "dog.safetensors")
    tensors = load_file(str(out))
    saved = load_file(str(concept_folder / "adapter.safetensors"))
    peft_downs = [k for k in saved if k.endswith(".lora_A.weight")]
    assert len(tensors) == 3 * len(peft_downs)
    for key in peft_downs:
        model_name, _, rest = key.partition(".")
        path = rest.removesuffix(".lora_A.weight")
        name = kohya_name(model_name, path)
        assert name.startswith("lora_unet_" if model_name == "unet" else "lora_te_")
        assert torch.equal(tensors[f"{name}.lora_down.weight"], saved[key])
        assert torch.equal(tensors[f"{name}.lora_up.weight"], saved[f"{model_name}.{path}.lora_B.weight"])
        assert tensors[f"{name}.lora_down.weight"].shape[0] == RANK
        assert float(tensors[f"{name}.alpha"]) == pytest.approx(ALPHA * RANK)
        # kohya's (alpha / rank) · up @ down is our alpha · B @ A
        assert torch.allclose(kohya_delta(tensors, name), ALPHA * saved[f"{model_name}.{path}.lora_B.weight"]
                              @ saved[key])
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == str(RANK)
    assert metadata["conceptflow_embedding"] == "embeddings/dog.safetensors"
    assert embedding_path(out, "dog").is_file()


def test_diffusers_load_lora_weights_reproduces_the_merged_concept(concept_folder, tiny_sd_path, tmp_path):
    out = export_kohya(concept_folder, tmp_path / "dog.safetensors")
    ours = load_base_pipeline("embedded:tiny-sd")
    concept = read_concept(concept_folder, ours)
    apply_concepts(ours, [concept])
    theirs = plain_pipeline(tiny_sd_path)
    theirs.load_lora_weights(str(out.parent), weight_name=out.name)  # offline diffusers wants weight_name

    from peft.tuners.lora import LoraLayer

    loaded = sum(isinstance(m, LoraLayer) for model in (theirs.unet, theirs.text_encoder) for m in model.modules())
    assert loaded == len(concept.deltas) > 0  # every LoRA of the file was mapped to a module

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, ours.text_encoder.config.hidden_size, generator=generator)
    ids = ours.tokenizer(["a photo of a dog", "a red cube"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    base = load_base_pipeline("embedded:tiny-sd")
    with torch.no_grad():
        unet_ours = ours.unet(latents, 10, encoder_hidden_states=context).sample
        unet_theirs = theirs.unet(latents, 10, encoder_hidden_states=context).sample
        unet_base = base.unet(latents, 10, encoder_hidden_states=context).sample
        text_ours, text_theirs = ours.text_encoder(ids)[0], theirs.text_encoder(ids)[0]
        text_base = base.text_encoder(ids)[0]
    # the effect is large next to the difference: the LoRA was applied, identically
    assert (unet_ours - unet_base).abs().max() > 1e-2 and (text_ours - text_base).abs().max() > 1e-1
    assert torch.allclose(unet_theirs, unet_ours, atol=1e-5)
    assert torch.allclose(text_theirs, text_ours, atol=1e-5)

    # merged into the weights, diffusers' LoRA is our W0 + alpha·B@A to float rounding
    theirs.fuse_lora()
    theirs.unload_lora_weights()
    for qualified, delta in concept.deltas.items():
        model_name, _, path = qualified.partition(".")
        weight = getattr(theirs, model_name).get_submodule(path).weight
        assert torch.allclose(weight, getattr(ours, model_name).get_submodule(path).weight, atol=1e-6), qualified


def test_export_kohya_refuses_other_methods(tmp_path):
    save_adapter(tmp_path / "heart", {"embedding.<heart1_l00>": torch.zeros(4)}, {"method": "conceptflow_s",
                                                                                    "name": "heart"})
    with pytest.raises(ConceptflowError, match="not edlora"):
        export_kohya(tmp_path / "heart", tmp_path / "heart.safetensors")


# --- embedding files ----------------------------------------------------------------------


def test_single_embedding_forms():
    layerwise = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3)
    assert torch.equal(single_embedding(layerwise, "mean"), layerwise.mean(0))
    assert torch.equal(single_embedding(layerwise, "middle"), layerwise[2])
    with pytest.raises(ConceptflowError, match="mean"):
        single_embedding(layerwise, "median")


def test_layerwise_rows_are_ordered_by_layer_and_part():
    rows = {f"<c{part}_l{layer:02d}>": torch.full((3,), 10.0 * layer + part) for layer in range(3) for part in (1, 2)}
    rows["<other1_l00>"] = torch.zeros(3)
    table = layerwise_embeddings(rows, "c")
    assert table.shape == (3, 2, 3) and table[2, 1, 0] == 22 and table[0, 0, 0] == 1
    del rows["<c2_l01>"]
    with pytest.raises(ConceptflowError, match="missing"):
        layerwise_embeddings(rows, "c")


def test_embedding_file_loads_with_load_textual_inversion(concept_folder, tiny_sd_path, tmp_path):
    out = export_kohya(concept_folder, tmp_path / "dog.safetensors")
    file = embedding_path(out, "dog")
    assert set(load_file(str(file))) == {EMBEDDING_KEY}
    saved = load_file(str(concept_folder / "adapter.safetensors"))
    expected = concept_vectors({k.removeprefix("embedding."): v for k, v in saved.items() if k.startswith("embedding.")},
                               "dog")
    assert torch.equal(read_embedding_file(file), expected) and expected.shape == (2, 32)

    pipeline = plain_pipeline(tiny_sd_path)
    pipeline.load_textual_inversion(str(file), token="<dog>")
    table = pipeline.text_encoder.get_input_embeddings().weight
    ids = pipeline.tokenizer.convert_tokens_to_ids(["<dog>", "<dog>_1"])
    assert torch.equal(table[ids].detach(), expected)
    assert pipeline.maybe_convert_prompt("a <dog> on sand", pipeline.tokenizer) == "a <dog> <dog>_1 on sand"


# --- fused combination as a diffusers folder ----------------------------------------------


@pytest.fixture(scope="module")
def fused_folder(tmp_path_factory, tiny_sd_path):
    from conceptflow.fuse.average import average_fuse

    root = tmp_path_factory.mktemp("fused")
    pipeline = load_base_pipeline("embedded:tiny-sd")
    concepts = [read_concept(make_edlora_concept(root / name, pipeline, name, seed), pipeline)
                for name, seed in (("dog", 1), ("cat", 2))]
    paths = sorted({path for concept in concepts for path in concept.deltas})
    weights = average_fuse(base_weights(pipeline, paths), concepts, 1.0)
    meta = {"kind": "fused", "name": "dog+cat", "method": "average", "adapter_scale": 1.0,
            "concepts": {c.name: {"method": "edlora", "md5": "x", "class_word": "dog"} for c in concepts},
            "base_model": "embedded:tiny-sd", "base_model_hash": model_fingerprint("embedded:tiny-sd")}
    return save_adapter(root / "dog+cat", fused_tensors(weights, merged_embeddings(concepts)), meta)


def test_fused_folder_loads_in_plain_diffusers(fused_folder, tmp_path):
    from conceptflow.exports.diffusers_folder import EXPORT_FILE, export_fused_pipeline

    out = export_fused_pipeline(fused_folder, tmp_path / "pipe", "embedded:tiny-sd")
    pipeline = plain_pipeline(out)
    base = load_base_pipeline("embedded:tiny-sd")
    saved = load_file(str(fused_folder / "adapter.safetensors"))
    fused = {k.removeprefix("weight."): v for k, v in saved.items() if k.startswith("weight.")}
    assert any(k.startswith("unet.") for k in fused) and any(k.startswith("text_encoder.") for k in fused)
    for model_name in ("unet", "text_encoder"):
        for name, parameter in getattr(pipeline, model_name).named_parameters():
            qualified = f"{model_name}.{name.removesuffix('.weight')}"
            if name.endswith(".weight") and qualified in fused:
                assert torch.equal(parameter, fused[qualified]), qualified
            elif name != "text_model.embeddings.token_embedding.weight":
                assert torch.equal(parameter, getattr(base, model_name).get_parameter(name)), name

    embeddings = {k.removeprefix("embedding."): v for k, v in saved.items() if k.startswith("embedding.")}
    table = pipeline.text_encoder.get_input_embeddings().weight
    for name in ("dog", "cat"):
        ids = pipeline.tokenizer.convert_tokens_to_ids([f"<{name}>", f"<{name}>_1"])
        assert torch.equal(table[ids].detach(), concept_vectors(embeddings, name))
    prompt = pipeline.maybe_convert_prompt("a <dog> and a <cat>", pipeline.tokenizer)
    assert prompt == "a <dog> <dog>_1 and a <cat> <cat>_1"
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["concepts"]["cat"]["tokens"] == ["<cat>", "<cat>_1"]

    # it draws from a catalog-style prompt with its own scheduler (DPM-Solver++), as exported
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    image = pipeline("a <dog> and a <cat>", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_fused_export_refuses_another_base_and_foreign_folders(fused_folder, tmp_path):
    from conceptflow.exports.diffusers_folder import export_fused_pipeline

    meta_path = fused_folder / "concept.json"
    original = meta_path.read_text()
    try:
        meta_path.write_text(json.dumps({**json.loads(original), "base_model_hash": "0" * 32}))
        with pytest.raises(ConceptflowError, match="fingerprint"):
            export_fused_pipeline(fused_folder, tmp_path / "pipe", "embedded:tiny-sd")
    finally:
        meta_path.write_text(original)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ConceptflowError, match="not a conceptflow export"):
        export_fused_pipeline(fused_folder, tmp_path / "busy", "embedded:tiny-sd")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


# --- the command --------------------------------------------------------------------------


@pytest.fixture
def toy_catalog(tmp_path, tiny_sd_path):
    from conceptflow.config import load_catalog
    from conceptflow.layout import Layout
    from conceptflow.toy.concepts import write_toy_catalog

    path = write_toy_catalog(tmp_path, ["zigzag_star", "quartered_heart"], images_per_concept=1)
    layout = Layout(load_catalog(path))
    make_edlora_concept(layout.adapter("zigzag_star"), load_base_pipeline("embedded:tiny-sd"), "zigzag_star", 3)
    return path, layout


def invoke(*arguments):
    from conceptflow.cli import app

    return CliRunner().invoke(app, [str(a) for a in arguments])


def test_export_command_writes_a_concept_by_catalog_name(toy_catalog, tmp_path):
    catalog, _ = toy_catalog
    result = invoke("export", "zigzag_star", "--format", "kohya", "--out", tmp_path / "out" / "zigzag_star.safetensors",
                    "--catalog", catalog)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "zigzag_star.safetensors").is_file()
    assert (tmp_path / "out" / "embeddings" / "zigzag_star.safetensors").is_file()
    result = invoke("export", "zigzag_star", "--format", "embedding", "--out", tmp_path / "zz.safetensors",
                    "--catalog", catalog)
    assert result.exit_code == 0, result.output
    assert read_embedding_file(tmp_path / "zz.safetensors").shape == (2, 32)


@pytest.mark.parametrize("arguments, message", [
    (("nope", "--format", "kohya"), "no concept or combination named 'nope'"),
    (("zigzag_star", "--format", "diffusers"), "exports to ['embedding', 'kohya'], not 'diffusers'"),
    (("zigzag_star", "--format", "lycoris"), "'lycoris' is for conceptflow_s concepts"),
    (("quartered_heart", "--format", "kohya"), "run `conceptflow train`"),
    (("zigzag_star+quartered_heart", "--format", "kohya"), "exports to ['diffusers'], not 'kohya'"),
    (("zigzag_star+quartered_heart", "--format", "diffusers"), "run `conceptflow fuse`"),
])
def test_export_command_errors_name_what_is_available(toy_catalog, tmp_path, arguments, message):
    catalog, _ = toy_catalog
    result = invoke("export", *arguments, "--out", tmp_path / "out.safetensors", "--catalog", catalog)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.safetensors").exists()


def test_fused_folder_with_run_time_parts_is_refused_as_a_diffusers_folder(fused_folder, tmp_path):
    import shutil

    from conceptflow.exports.diffusers_folder import export_fused_pipeline

    folder = tmp_path / "with-parts"
    shutil.copytree(fused_folder, folder)
    meta = json.loads((folder / "concept.json").read_text())
    meta["runtime_parts"] = [{"name": "tova_dog", "method": "tova", "token_deltas": {}, "text_residuals": []}]
    (folder / "concept.json").write_text(json.dumps(meta))
    with pytest.raises(ConceptflowError, match=r"\['tova_dog'\] act only at run time"):
        export_fused_pipeline(folder, tmp_path / "pipe", "embedded:tiny-sd")
    assert not (tmp_path / "pipe").exists()
