"""KronA-WED (ConceptFlow-S Eq. 2) against its closed form, LyCORIS's factorisation, and the tiny UNet."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from lycoris.functional import factorization as lycoris_factorization
from torch import nn

from conceptflow.methods.conceptflow_s.krona_wed import (
    KronaWEDLinear,
    factorization,
    inject_krona_wed,
    krona_wed_state_dict,
    load_krona_wed_state_dict,
)
from conceptflow.attention.processor import attention_controller_of
from conceptflow.errors import ConceptflowError
from conceptflow.models.embedded import embedded_model_path

FORWARD_MODES = ["factored", "materialized"]
AXES = ["rows", "columns"]
# (out, in): tiny-base sizes (below 16 × 16, where factorization's divisibility rule kicks in),
# sizes whose factors are not the divisibility shortcut, and non-square A and B.
LAYER_SHAPES = [(32, 32), (64, 32), (48, 80), (96, 40)]


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(embedded_model_path("embedded:tiny-sd"), subfolder="unet").eval()


def unet_inputs(unet: UNet2DConditionModel, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return {
        "sample": torch.randn(2, unet.config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator),
    }


def randomise(module: KronaWEDLinear, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in (module.kron_a, module.kron_b):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        module.magnitude.mul_(0.5 + torch.rand(module.magnitude.shape, generator=generator))


def closed_form_weight(module: KronaWEDLinear, detach_norm: bool = False) -> torch.Tensor:
    """W' = m ⊙ (W0 + A⊗B) / ‖W0 + A⊗B‖ (per row or per column), written with torch.kron."""
    direction = module.base_layer.weight + torch.kron(module.kron_a, module.kron_b)
    if module.weight_decompose == "columns":
        norms = direction.norm(dim=0, keepdim=True)
        return module.magnitude.unsqueeze(0) * direction / (norms.detach() if detach_norm else norms)
    norms = direction.norm(dim=1, keepdim=True)
    return module.magnitude.unsqueeze(1) * direction / (norms.detach() if detach_norm else norms)


@pytest.mark.parametrize(("dimension", "expected"), [
    (320, (16, 20)), (640, (16, 40)), (768, (16, 48)), (1280, (16, 80)),
    (32, (2, 16)), (64, (4, 16)), (40, (5, 8)), (127, (1, 127)),
])
def test_factorization_table(dimension, expected):
    assert factorization(dimension, 16) == expected


@pytest.mark.parametrize("factor", [-1, 2, 4, 8, 16, 32])
def test_factorization_matches_lycoris(factor):
    for dimension in range(1, 1400):
        assert factorization(dimension, factor) == lycoris_factorization(dimension, factor), dimension


@pytest.mark.parametrize("weight_decompose", AXES)
@pytest.mark.parametrize("forward_mode", FORWARD_MODES + ["auto"])
@pytest.mark.parametrize(("out_features", "in_features"), LAYER_SHAPES)
def test_equals_base_layer_at_init(out_features, in_features, forward_mode, weight_decompose):
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features)
    module = KronaWEDLinear(base, forward_mode=forward_mode, weight_decompose=weight_decompose)
    assert module.magnitude.shape == ((out_features,) if weight_decompose == "rows" else (in_features,))
    inputs = torch.randn(3, 5, in_features)
    assert torch.count_nonzero(module.kron_a) > 0 and torch.count_nonzero(module.kron_b) == 0
    torch.testing.assert_close(module(inputs), base(inputs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.delta_weight(), torch.zeros_like(base.weight), rtol=0, atol=1e-6)


@pytest.mark.parametrize("weight_decompose", AXES)
@pytest.mark.parametrize("forward_mode", FORWARD_MODES)
@pytest.mark.parametrize(("out_features", "in_features"), LAYER_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_closed_form(out_features, in_features, bias, forward_mode, weight_decompose):
    torch.manual_seed(1)
    module = KronaWEDLinear(nn.Linear(in_features, out_features, bias=bias), forward_mode=forward_mode,
                            weight_decompose=weight_decompose)
    randomise(module, seed=2)
    weight = closed_form_weight(module)
    inputs = torch.randn(4, 3, in_features)
    expected = F.linear(inputs, weight, module.base_layer.bias)
    assert (weight - module.base_layer.weight).abs().max() > 0.1  # the update is not negligible
    torch.testing.assert_close(module(inputs), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.merged_weight(), weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.delta_weight(), weight - module.base_layer.weight, rtol=1e-5, atol=1e-6)
    norm_axis = 1 if weight_decompose == "rows" else 0
    torch.testing.assert_close(module.merged_weight().norm(dim=norm_axis), module.magnitude, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_decompose", AXES)
@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("forward_mode", FORWARD_MODES)
def test_gradients_match_closed_form(forward_mode, detach_norm, weight_decompose):
    torch.manual_seed(3)
    module = KronaWEDLinear(nn.Linear(48, 64), forward_mode=forward_mode, detach_norm=detach_norm,
                            weight_decompose=weight_decompose)
    randomise(module, seed=4)
    inputs = torch.randn(6, 48, requires_grad=True)
    target = torch.randn(6, 64)
    parameters = [module.kron_a, module.kron_b, module.magnitude, inputs]

    F.mse_loss(module(inputs), target).backward()
    ours = [parameter.grad.clone() for parameter in parameters]
    for parameter in parameters:
        parameter.grad = None
    expected_out = F.linear(inputs, closed_form_weight(module, detach_norm), module.base_layer.bias)
    F.mse_loss(expected_out, target).backward()
    for got, parameter in zip(ours, parameters):
        torch.testing.assert_close(got, parameter.grad, rtol=1e-4, atol=1e-6)
    assert module.base_layer.weight.grad is None and module.base_layer.bias.grad is None


def test_auto_mode_picks_by_size():
    small = KronaWEDLinear(nn.Linear(32, 32))
    large = KronaWEDLinear(nn.Linear(768, 1280))
    assert not small.uses_factored_forward(256)
    assert large.uses_factored_forward(77) and not large.uses_factored_forward(4096)


def test_rejects_a_that_does_not_tile_the_weight():
    with pytest.raises(ValueError, match="does not tile"):
        KronaWEDLinear(nn.Linear(32, 32), a_shape=(3, 2))


def test_inject_wraps_every_attention_linear(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    modules = inject_krona_wed(unet)
    attention_paths = {name for name, _ in tiny_unet.named_modules() if name.endswith((".attn1", ".attn2"))}
    expected = {f"{attention}.{linear}" for attention in attention_paths
                for linear in ("to_q", "to_k", "to_v", "to_out.0")}
    assert set(modules) == expected and len(expected) == 56
    assert all(isinstance(unet.get_submodule(path), KronaWEDLinear) for path in expected)
    assert inject_krona_wed(unet).keys() == modules.keys()  # idempotent
    assert all(unet.get_submodule(path) is module for path, module in modules.items())


@pytest.mark.parametrize("with_controller", [False, True])
def test_injected_unet_equals_base_at_init(tiny_unet, with_controller):
    unet = copy.deepcopy(tiny_unet)
    if with_controller:
        attention_controller_of(unet)
    inject_krona_wed(unet)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, tiny_unet(**inputs).sample, rtol=1e-4, atol=1e-5)


def test_gradients_reach_exactly_the_adapter(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    modules = inject_krona_wed(unet)
    for index, module in enumerate(modules.values()):
        randomise(module, seed=index)
    unet(**unet_inputs(unet)).sample.square().mean().backward()

    adapter_names = {f"{path}.{suffix}" for path in modules for suffix in ("kron_a", "kron_b", "magnitude")}
    trainable = {name for name, parameter in unet.named_parameters() if parameter.requires_grad}
    with_grad = {name for name, parameter in unet.named_parameters() if parameter.grad is not None}
    assert trainable == adapter_names and with_grad == adapter_names
    assert all(torch.count_nonzero(unet.get_parameter(name).grad) > 0 for name in adapter_names)


@pytest.mark.parametrize("weight_decompose", AXES)
def test_state_dict_round_trip(tiny_unet, weight_decompose):
    unet = copy.deepcopy(tiny_unet)
    modules = inject_krona_wed(unet, weight_decompose=weight_decompose)
    for index, module in enumerate(modules.values()):
        randomise(module, seed=10 + index)
    state = krona_wed_state_dict(modules)
    assert len(state) == 3 * 56 and all(key.rsplit(".", 1)[1] in ("kron_a", "kron_b", "magnitude") for key in state)

    restored = copy.deepcopy(tiny_unet)
    loaded = load_krona_wed_state_dict(restored, state, weight_decompose=weight_decompose)
    assert loaded.keys() == modules.keys()
    assert all(module.weight_decompose == weight_decompose for module in loaded.values())
    inputs = unet_inputs(unet, seed=1)
    with torch.no_grad():
        expected = unet(**inputs).sample
        assert (expected - tiny_unet(**inputs).sample).abs().max() > 1e-3
        torch.testing.assert_close(restored(**inputs).sample, expected, rtol=1e-5, atol=1e-5)


def test_state_dict_with_another_factor_loads(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    modules = inject_krona_wed(unet, factor=4)
    path = next(iter(modules))
    randomise(modules[path], seed=5)
    restored = copy.deepcopy(tiny_unet)
    inject_krona_wed(restored, factor=16)  # the loader re-wraps layers whose A differs
    loaded = load_krona_wed_state_dict(restored, krona_wed_state_dict(modules))
    assert loaded[path].kron_a.shape == modules[path].kron_a.shape == (4, 4)
    torch.testing.assert_close(loaded[path].merged_weight(), modules[path].merged_weight())


def test_load_rejects_foreign_tensors(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    with pytest.raises(ConceptflowError, match="not a linear layer"):
        load_krona_wed_state_dict(unet, {"conv_in.kron_a": torch.zeros(2, 2), "conv_in.kron_b": torch.zeros(2, 2),
                                         "conv_in.magnitude": torch.zeros(4)})
    path = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(ConceptflowError, match="lack"):
        load_krona_wed_state_dict(unet, {f"{path}.kron_a": torch.zeros(4, 4)})
    with pytest.raises(ConceptflowError, match="do not fit"):
        load_krona_wed_state_dict(unet, {f"{path}.kron_a": torch.zeros(4, 4), f"{path}.kron_b": torch.zeros(8, 16),
                                         f"{path}.magnitude": torch.zeros(64)})


def test_axes_differ_and_load_with_the_wrong_axis_is_refused(tiny_unet):
    """Row and column norms are different functions (so the axis matters), and m's length is checked."""
    torch.manual_seed(6)
    base = nn.Linear(32, 64)
    rows, columns = (KronaWEDLinear(base, weight_decompose=axis) for axis in AXES)
    for module in (rows, columns):
        randomise(module, seed=7)
    with torch.no_grad():
        columns.kron_a.copy_(rows.kron_a)
        columns.kron_b.copy_(rows.kron_b)
    assert (rows.merged_weight() - columns.merged_weight()).abs().max() > 0.1

    unet = copy.deepcopy(tiny_unet)
    modules = inject_krona_wed(unet, weight_decompose="columns")
    path = next(p for p, m in modules.items() if m.in_features != m.out_features)
    state = {k: v for k, v in krona_wed_state_dict(modules).items() if k.startswith(f"{path}.")}
    with pytest.raises(ConceptflowError, match="one per output row"):
        load_krona_wed_state_dict(copy.deepcopy(tiny_unet), state, weight_decompose="rows")


def test_weight_decompose_default_keeps_config_hashes():
    """'rows' (the default, and the only axis before the setting) is left out of dumps, so the
    config hash of every existing concept is unchanged; 'columns' is written and hashed."""
    from conceptflow.config import config_hash
    from conceptflow.methods.conceptflow_s.config import ConceptFlowSTrainConfig

    # The exclusion is tied to the value "rows": if the default ever changes, absent must still
    # mean "rows" for old catalogs, so the exclusion has to be revisited with it.
    assert ConceptFlowSTrainConfig.model_fields["weight_decompose"].default == "rows"
    rows, columns = ConceptFlowSTrainConfig(), ConceptFlowSTrainConfig(weight_decompose="columns")
    assert "weight_decompose" not in rows.model_dump(mode="json")
    assert columns.model_dump(mode="json")["weight_decompose"] == "columns"
    assert config_hash(rows) == config_hash(ConceptFlowSTrainConfig.model_validate(rows.model_dump(mode="json")))
    assert config_hash(rows) != config_hash(columns)
    assert ConceptFlowSTrainConfig.model_validate(columns.model_dump(mode="json")).weight_decompose == "columns"
