"""KronA-WED ⇄ LyCORIS LoKr (dora_wd): files we write load in the lycoris library and vice versa."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from lycoris import kohya
from lycoris.modules.lokr import LokrModule
from lycoris.utils.preset import read_preset
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conceptflow.methods.conceptflow_s.krona_wed import KronaWEDLinear, inject_krona_wed, krona_wed_state_dict
from conceptflow.methods.conceptflow_s.lycoris import export_lycoris, load_lycoris_file, lycoris_name
from conceptflow.errors import ConceptflowError
from conceptflow.models.embedded import embedded_model_path

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


def trained_krona_unet(base: UNet2DConditionModel) -> tuple[UNet2DConditionModel, dict[str, KronaWEDLinear]]:
    unet = copy.deepcopy(base)
    modules = inject_krona_wed(unet)
    for index, module in enumerate(modules.values()):
        randomise_(module.kron_a, module.kron_b, module.magnitude, seed=index)
    return unet, modules


def forward(unet: UNet2DConditionModel) -> torch.Tensor:
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


def test_export_writes_lycoris_keys(tiny_unet, tmp_path):
    _, modules = trained_krona_unet(tiny_unet)
    path = export_lycoris(modules, tmp_path / "adapter.safetensors")
    module_path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert lycoris_name(module_path) == name
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        assert len(keys) == 4 * 56
        assert handle.get_tensor(f"{name}.lokr_w1").shape == (4, 2)  # 64 = 4·16 out, 32 = 2·16 in
        assert handle.get_tensor(f"{name}.lokr_w2").shape == (16, 16)
        assert handle.get_tensor(f"{name}.dora_scale").shape == (64, 1)
        assert handle.metadata()["ss_network_module"] == "lycoris.kohya"


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


def test_lycoris_file_loads_into_ours(tiny_unet, tmp_path, attention_only_preset):
    theirs = copy.deepcopy(tiny_unet)
    network = kohya.create_network(1.0, 4, 1.0, None, None, theirs, algo="lokr", factor=16,
                                   dora_wd=True, full_matrix=True, preset=attention_only_preset)
    network.apply_to(None, theirs, apply_text_encoder=False, apply_unet=True)
    for index, lora in enumerate(network.unet_loras):
        randomise_(lora.lokr_w1, lora.lokr_w2, lora.dora_scale, seed=100 + index)
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), torch.float32, {})

    ours = copy.deepcopy(tiny_unet)
    modules = load_lycoris_file(ours, path)
    assert len(modules) == 56
    expected = forward(theirs)
    assert (expected - forward(tiny_unet)).abs().max() > 1e-2
    torch.testing.assert_close(forward(ours), expected, rtol=1e-4, atol=1e-5)


def test_round_trip_through_our_loader(tiny_unet, tmp_path):
    ours, modules = trained_krona_unet(tiny_unet)
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
    ("dora_scale", {"dora_scale": torch.ones(1, 32)}, "column norms"),
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
