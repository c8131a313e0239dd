"""KronA-WED ⇄ LyCORIS LoKr (dora_wd) and full ``diff`` files: files we write load in the lycoris
library and vice versa, both norm axes; the UIs' documented formulas (AUTOMATIC1111 v1.10's
``network_lokr.py`` / ``network.py: apply_weight_decompose`` / ``network_full.py``, ComfyUI's
``comfy/weight_adapter/lokr.py`` / ``base.py: weight_decompose`` / ``lora.py`` "diff" patches),
re-implemented here, give our W' for the formats we call UI-compatible and not for the row-form
LoKr. ``benchmarks/interop.py`` runs the loaders' own code on an SD-1.5-shaped UNet."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from lycoris import kohya
from lycoris.modules.lokr import LokrModule
from lycoris.utils.preset import read_preset
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conceptflow.adapters.concept_io import save_adapter
from conceptflow.errors import ConceptflowError
from conceptflow.methods import get_method
from conceptflow.methods.conceptflow_s.full_diff import diff_state_dict, export_diff
from conceptflow.methods.conceptflow_s.krona_wed import KronaWEDLinear, inject_krona_wed, krona_wed_state_dict
from conceptflow.methods.conceptflow_s.lycoris import export_lycoris, load_lycoris_file, lycoris_name
from conceptflow.methods.conceptflow_s.reader import krona_wed_deltas
from conceptflow.models.embedded import embedded_model_path
from conceptflow.models.loading import load_base_pipeline, model_fingerprint

AXES = ["rows", "columns"]
TINY_BASE = "embedded:tiny-sd"

# LyCORIS preset limiting a kohya network to the attention linears, as KronA-WED is placed.
ATTENTION_ONLY_PRESET = """enable_conv = false
unet_target_module = ["Attention"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""
KOHYA_TARGET_ATTRIBUTES = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                           "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME")


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(embedded_model_path("embedded:tiny-sd"), subfolder="unet").eval()


@pytest.fixture
def attention_only_preset(tmp_path):
    """LyCORIS's kohya networks limited to attention modules, for the duration of a test.

    Presets live in class attributes of ``LycorisNetworkKohya``, which are restored afterwards.
    ``create_network_from_weights`` (lycoris-lora 4.1.3) first builds a network from the
    class-level preset; the default "full" preset names ``time_embedding.linear_1`` both as a
    module type (TimestepEmbedding) and by name, which trips its duplicate-name assertion on a
    diffusers UNet, so the loading side needs this preset too.
    """
    saved = {name: getattr(kohya.LycorisNetworkKohya, name) for name in KOHYA_TARGET_ATTRIBUTES}
    preset = tmp_path / "attention_only.toml"
    preset.write_text(ATTENTION_ONLY_PRESET)
    kohya.LycorisNetworkKohya.apply_preset(read_preset(str(preset)))
    yield str(preset)
    for name, value in saved.items():
        setattr(kohya.LycorisNetworkKohya, name, value)


def unet_inputs(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    return {
        "sample": torch.randn(2, unet.config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor([3, 700]),
        "encoder_hidden_states": torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator),
    }


def randomise_(kron_a, kron_b, magnitude, seed: int) -> None:
    """Trained-looking adapter values: random A and B, magnitudes scaled by 0.5-1.5."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for factor in (kron_a, kron_b):
            factor.copy_(0.3 * torch.randn(factor.shape, generator=generator))
        magnitude.mul_(0.5 + torch.rand(magnitude.shape, generator=generator))


def trained_krona_unet(base: UNet2DConditionModel, weight_decompose: str = "rows"
                       ) -> tuple[UNet2DConditionModel, dict[str, KronaWEDLinear]]:
    unet = copy.deepcopy(base)
    modules = inject_krona_wed(unet, weight_decompose=weight_decompose)
    for index, module in enumerate(modules.values()):
        randomise_(module.kron_a, module.kron_b, module.magnitude, seed=index)
    return unet, modules


def forward(unet: UNet2DConditionModel) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


@pytest.mark.parametrize("weight_decompose", AXES)
def test_export_writes_lycoris_keys(tiny_unet, tmp_path, weight_decompose):
    _, modules = trained_krona_unet(tiny_unet, weight_decompose)
    path = export_lycoris(modules, tmp_path / "adapter.safetensors")
    module_path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert lycoris_name(module_path) == name
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        assert len(keys) == 4 * 56
        assert handle.get_tensor(f"{name}.lokr_w1").shape == (4, 2)  # 64 = 4·16 out, 32 = 2·16 in
        assert handle.get_tensor(f"{name}.lokr_w2").shape == (16, 16)
        # row norms: (out, 1), LyCORIS wd_on_output=True; column norms: (1, in), wd_on_output=False
        assert handle.get_tensor(f"{name}.dora_scale").shape == ((64, 1) if weight_decompose == "rows" else (1, 32))
        assert handle.metadata()["ss_network_module"] == "lycoris.kohya"
        network_args = json.loads(handle.metadata()["ss_network_args"])
        assert network_args["wd_on_output"] == str(weight_decompose == "rows")


def test_lycoris_loads_our_export_to_the_same_unet(tiny_unet, tmp_path, attention_only_preset):
    ours, modules = trained_krona_unet(tiny_unet)
    path = export_lycoris(modules, tmp_path / "adapter.safetensors")

    theirs = copy.deepcopy(tiny_unet)
    network, _ = kohya.create_network_from_weights(1.0, str(path), None, None, theirs)
    network.apply_to(None, theirs, apply_text_encoder=False, apply_unet=True)
    assert len(network.unet_loras) == 56
    assert all(isinstance(lora, LokrModule) and lora.wd and lora.scale == 1 for lora in network.unet_loras)

    expected = forward(ours)
    assert (expected - forward(tiny_unet)).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(forward(theirs), expected, rtol=1e-4, atol=1e-5)


def test_our_export_from_state_dict_equals_export_from_modules(tiny_unet, tmp_path):
    _, modules = trained_krona_unet(tiny_unet)
    from_modules = load_file(str(export_lycoris(modules, tmp_path / "a.safetensors")))
    from_state = load_file(str(export_lycoris(krona_wed_state_dict(modules), tmp_path / "b.safetensors")))
    assert from_modules.keys() == from_state.keys()
    assert all(torch.equal(from_modules[key], from_state[key]) for key in from_modules)


def test_lycoris_loads_our_column_export(tiny_unet, tmp_path, attention_only_preset):
    """lycoris-lora 4.1.3 rebuilds modules from a file with wd_on_out=True whatever dora_scale's
    shape, so a column-form file goes into a network created with wd_on_output=False."""
    ours, modules = trained_krona_unet(tiny_unet, "columns")
    path = export_lycoris(modules, tmp_path / "adapter.safetensors")

    theirs = copy.deepcopy(tiny_unet)
    network = kohya.create_network(1.0, 4, 1.0, None, None, theirs, algo="lokr", factor=16, dora_wd=True,
                                   wd_on_output=False, full_matrix=True, preset=attention_only_preset)
    network.apply_to(None, theirs, apply_text_encoder=False, apply_unet=True)
    assert network.load_weights(str(path)) == {}  # no missing or unexpected keys
    assert all(not lora.wd_on_out and lora.scale == 1 for lora in network.unet_loras)
    expected = forward(ours)
    assert (expected - forward(tiny_unet)).abs().max() > 1e-2
    torch.testing.assert_close(forward(theirs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weight_decompose", AXES)
def test_lycoris_file_loads_into_ours(tiny_unet, tmp_path, attention_only_preset, weight_decompose):
    theirs = copy.deepcopy(tiny_unet)
    network = kohya.create_network(1.0, 4, 1.0, None, None, theirs, algo="lokr", factor=16,
                                   dora_wd=True, full_matrix=True, preset=attention_only_preset,
                                   wd_on_output=weight_decompose == "rows")
    network.apply_to(None, theirs, apply_text_encoder=False, apply_unet=True)
    for index, lora in enumerate(network.unet_loras):
        randomise_(lora.lokr_w1, lora.lokr_w2, lora.dora_scale, seed=100 + index)
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), torch.float32, {})

    ours = copy.deepcopy(tiny_unet)
    modules = load_lycoris_file(ours, path)
    assert len(modules) == 56 and all(m.weight_decompose == weight_decompose for m in modules.values())
    expected = forward(theirs)
    assert (expected - forward(tiny_unet)).abs().max() > 1e-2
    torch.testing.assert_close(forward(ours), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weight_decompose", AXES)
def test_round_trip_through_our_loader(tiny_unet, tmp_path, weight_decompose):
    ours, modules = trained_krona_unet(tiny_unet, weight_decompose)
    path = export_lycoris(modules, tmp_path / "adapter.safetensors")
    restored = copy.deepcopy(tiny_unet)
    loaded = load_lycoris_file(restored, path)
    assert loaded.keys() == modules.keys()
    for module_path, module in modules.items():
        torch.testing.assert_close(loaded[module_path].merged_weight(), module.merged_weight())
    torch.testing.assert_close(forward(restored), forward(ours), rtol=1e-5, atol=1e-6)


def test_low_rank_lokr_halves_are_multiplied_out_with_alpha(tiny_unet, tmp_path):
    ours, modules = trained_krona_unet(tiny_unet)
    module_path, module = next(iter(modules.items()))
    name = lycoris_name(module_path)
    generator = torch.Generator().manual_seed(7)
    w2_a, w2_b = torch.randn(16, 3, generator=generator), torch.randn(3, 16, generator=generator)
    save_file({f"{name}.lokr_w1": module.kron_a.detach().clone(), f"{name}.lokr_w2_a": w2_a,
               f"{name}.lokr_w2_b": w2_b, f"{name}.alpha": torch.tensor(1.5),
               f"{name}.dora_scale": module.magnitude.detach().reshape(-1, 1).clone()}, str(tmp_path / "lr.safetensors"))
    loaded = load_lycoris_file(copy.deepcopy(tiny_unet), tmp_path / "lr.safetensors")[module_path]
    torch.testing.assert_close(loaded.kron_b, w2_a @ w2_b * (1.5 / 3))


@pytest.mark.parametrize(("drop", "replace", "message"), [
    ("dora_scale", {}, "no dora_scale"),
    ("lokr_w1", {"lora_down.weight": torch.zeros(4, 32)}, "not LoKr"),
    ("dora_scale", {"dora_scale": torch.ones(3, 1)}, "fits neither"),
])
def test_loader_refuses_what_is_not_krona_wed(tiny_unet, tmp_path, drop, replace, message):
    _, modules = trained_krona_unet(tiny_unet)
    module_path, module = next(iter(modules.items()))
    name = lycoris_name(module_path)
    tensors = {f"{name}.lokr_w1": module.kron_a.detach(), f"{name}.lokr_w2": module.kron_b.detach(),
               f"{name}.alpha": torch.tensor(1.0), f"{name}.dora_scale": module.magnitude.detach().reshape(-1, 1)}
    tensors.pop(f"{name}.{drop}")
    tensors.update({f"{name}.{key}": value for key, value in replace.items()})
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConceptflowError, match=message):
        load_lycoris_file(copy.deepcopy(tiny_unet), tmp_path / "bad.safetensors")


def test_loader_refuses_keys_of_other_models(tiny_unet, tmp_path):
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1": torch.zeros(2, 2)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(ConceptflowError, match="not a linear layer of this UNet"):
        load_lycoris_file(copy.deepcopy(tiny_unet), tmp_path / "te.safetensors")


# --- the UIs' formulas, as their loaders document them in code --------------------------------

def a1111_lokr_weight(group: dict[str, torch.Tensor], base_weight: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111 v1.10: network_lokr.py ``calc_updown`` (kron(w1, w2), scale 1 without low-rank
    halves) then network.py ``apply_weight_decompose``: column norms of W0 + ΔW, no eps, the
    dora_scale broadcast against them as stored; network_apply_weights adds the result to W0."""
    merged = base_weight + torch.kron(group["lokr_w1"], group["lokr_w2"])
    column_norms = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    return base_weight + (merged * (group["dora_scale"] / column_norms) - base_weight)


def comfyui_lokr_weight(group: dict[str, torch.Tensor], base_weight: torch.Tensor) -> torch.Tensor:
    """ComfyUI: weight_adapter/lokr.py ``calculate_weight`` (alpha 1 with full halves) then
    base.py ``weight_decompose``: the output-axis branch (dora_scale.shape[0] == out) divides by
    the norm of W0, the other by the column norms of W0 + ΔW; + eps either way."""
    dora_scale = group["dora_scale"]
    merged = base_weight + torch.kron(group["lokr_w1"], group["lokr_w2"])
    if dora_scale.shape[0] == merged.shape[0]:
        norms = base_weight.norm(dim=1, keepdim=True)
    else:
        norms = merged.norm(dim=0, keepdim=True)
    return merged * (dora_scale / (norms + torch.finfo(torch.float32).eps))


def ui_diff_weight(diff: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
    """Both UIs on a ``diff`` key: ComfyUI lora.py "diff" patch (weight += strength · diff),
    A1111 network_full.py (updown = diff, scale 1 without alpha)."""
    return base_weight + diff


def relative_error(weight: torch.Tensor, expected: torch.Tensor) -> float:
    return float((weight - expected).norm() / expected.norm())


@pytest.mark.parametrize("ui_weight", [a1111_lokr_weight, comfyui_lokr_weight])
def test_uis_compute_our_weight_from_the_column_form_only(tiny_unet, tmp_path, ui_weight):
    for weight_decompose, exact in (("columns", True), ("rows", False)):
        _, modules = trained_krona_unet(tiny_unet, weight_decompose)
        tensors = load_file(str(export_lycoris(modules, tmp_path / f"{weight_decompose}.safetensors")))
        errors = []
        for path, module in modules.items():
            name = lycoris_name(path)
            group = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith(f"{name}.")}
            expected = module.merged_weight().detach()
            errors.append(relative_error(ui_weight(group, module.base_layer.weight.detach()), expected))
        if exact:
            assert max(errors) <= 1e-6, (weight_decompose, max(errors))
        else:  # the row-norm LoKr is loaded but computed wrongly: the check can fail
            assert min(errors) > 1e-3, (weight_decompose, min(errors))


@pytest.mark.parametrize("weight_decompose", AXES)
def test_diff_keys_hold_the_merged_update_exactly(tiny_unet, tmp_path, weight_decompose):
    _, modules = trained_krona_unet(tiny_unet, weight_decompose)
    deltas = {path: module.delta_weight().detach() for path, module in modules.items()}
    path = export_diff(deltas, tmp_path / "diff.safetensors")
    tensors = load_file(str(path))
    assert set(tensors) == {f"{lycoris_name(p)}.diff" for p in modules} and len(tensors) == 56
    for module_path, module in modules.items():
        diff = tensors[f"{lycoris_name(module_path)}.diff"]
        assert diff.dtype == torch.float32 and diff.shape == module.base_layer.weight.shape
        assert torch.equal(diff, deltas[module_path])
        weight = ui_diff_weight(diff, module.base_layer.weight.detach())
        assert relative_error(weight, module.merged_weight().detach()) <= 1e-6
    assert diff_state_dict({f"unet.{p}": d for p, d in deltas.items()}).keys() == tensors.keys()


@pytest.fixture
def concept_folders(tiny_unet, tmp_path):
    """Saved ConceptFlow-S concept folders on the embedded tiny base, one per axis."""
    folders = {}
    for weight_decompose in AXES:
        _, modules = trained_krona_unet(tiny_unet, weight_decompose)
        tensors = {f"unet.{k}": v for k, v in krona_wed_state_dict(modules).items()}
        tensors["embedding.<c1_l00>"] = torch.zeros(32)
        meta = {"method": "conceptflow_s", "name": "c", "base_model": TINY_BASE,
                "base_model_hash": model_fingerprint(TINY_BASE), "adapter": "krona_wed"}
        if weight_decompose == "columns":  # folders from before the setting have no key: rows
            meta["weight_decompose"] = "columns"
        folders[weight_decompose] = save_adapter(tmp_path / weight_decompose, tensors, meta)
    return folders


def test_registry_exporters_write_the_formats_the_axis_allows(concept_folders, tmp_path):
    spec = get_method("conceptflow_s")
    assert set(spec.exporters) == {"lycoris", "diff", "lycoris-rows"}
    columns_file = spec.exporter("lycoris")(concept_folders["columns"], tmp_path / "c.safetensors")
    assert {t.shape[0] for k, t in load_file(str(columns_file)).items() if k.endswith("dora_scale")} == {1}
    with pytest.raises(ConceptflowError, match="'diff'"):
        spec.exporter("lycoris")(concept_folders["rows"], tmp_path / "r.safetensors")
    rows_file = spec.exporter("lycoris-rows")(concept_folders["rows"], tmp_path / "r.safetensors")
    assert {t.shape[1] for k, t in load_file(str(rows_file)).items() if k.endswith("dora_scale")} == {1}
    with pytest.raises(ConceptflowError, match="'lycoris'"):
        spec.exporter("lycoris-rows")(concept_folders["columns"], tmp_path / "x.safetensors")

    pipeline = load_base_pipeline(TINY_BASE)
    for weight_decompose, folder in concept_folders.items():
        diff_file = spec.exporter("diff")(folder, tmp_path / f"{weight_decompose}.diff.safetensors")
        tensors, meta = save_and_read(folder)
        expected = krona_wed_deltas(tensors, meta, pipeline)
        written = load_file(str(diff_file))
        assert len(written) == len(expected) == 56
        assert all(torch.equal(written[f"{lycoris_name(p.removeprefix('unet.'))}.diff"], d) for p, d in expected.items())


def test_diff_export_refuses_another_base(concept_folders, tmp_path):
    tensors, meta = save_and_read(concept_folders["rows"])
    save_adapter(tmp_path / "moved", tensors, {**meta, "base_model_hash": "0" * 32})
    with pytest.raises(ConceptflowError, match="base_model_hash"):
        get_method("conceptflow_s").exporter("diff")(tmp_path / "moved", tmp_path / "d.safetensors")


def save_and_read(folder):
    """(tensors, concept.json) of a saved concept folder."""
    from conceptflow.adapters.concept_io import read_adapter

    return read_adapter(folder)


def test_diff_export_finds_a_catalog_relative_base(tmp_path, monkeypatch):
    """concept.json keeps the catalog's spelling of the base (e.g. assets/toy-base): the exporter
    finds it under the concept folder's parents, whatever the current directory."""
    import shutil

    root = tmp_path / "project"
    shutil.copytree(embedded_model_path(TINY_BASE), root / "assets" / "base")
    unet = UNet2DConditionModel.from_pretrained(root / "assets" / "base", subfolder="unet").eval()
    _, modules = trained_krona_unet(unet, "rows")
    tensors = {f"unet.{k}": v for k, v in krona_wed_state_dict(modules).items()}
    meta = {"method": "conceptflow_s", "name": "c", "base_model": "assets/base",
            "base_model_hash": model_fingerprint(str(root / "assets" / "base"))}
    folder = save_adapter(root / "data" / "adapters" / "c", tensors, meta)
    monkeypatch.chdir(tmp_path)
    written = load_file(str(get_method("conceptflow_s").exporter("diff")(folder, tmp_path / "d.safetensors")))
    assert len(written) == 56
    for path, module in modules.items():
        assert torch.equal(written[f"{lycoris_name(path)}.diff"], module.delta_weight().detach())
