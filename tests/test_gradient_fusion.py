"""Gradient fusion on a pipeline: captured inputs, the closed form's optimality, tokens kept."""

from types import SimpleNamespace

import pytest
import torch

from conceptflow.adapters.effects import ConceptEffects
from conceptflow.adapters.merge import base_weights
from conceptflow.adapters.tokens import concept_token_strings
from conceptflow.attention.processor import attention_controller_of
from conceptflow.config import FuseConfig
from conceptflow.fuse.average import average_fuse
from conceptflow.fuse.gradient import _load_concept_weights, capture_unet, gradient_fuse
from conceptflow.fuse.solvers import fusion_objective

SCALE = 0.7


def random_concept(pipeline, name: str, seed: int) -> ConceptEffects:
    generator = torch.Generator().manual_seed(seed)
    n_layers = attention_controller_of(pipeline.unet).n_cross_layers
    embeddings = {token: torch.randn(32, generator=generator) * 0.1 for token in concept_token_strings(name, n_layers)}
    deltas = {}
    for model_name, suffixes in (("unet", (".to_q", ".to_k", ".to_v", ".to_out.0")),
                                 ("text_encoder", (".q_proj", ".k_proj", ".v_proj", ".out_proj"))):
        model = getattr(pipeline, model_name)
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith(suffixes):
                out_features, in_features = module.weight.shape
                up = torch.randn(out_features, 4, generator=generator)
                down = torch.randn(4, in_features, generator=generator)
                deltas[f"{model_name}.{path}"] = 0.05 * up @ down / 4
    return ConceptEffects({"name": name, "method": "edlora", "class_word": name}, embeddings, deltas)


@pytest.fixture
def setting(tiny_pipeline):
    concepts = [random_concept(tiny_pipeline, "alpha", 1), random_concept(tiny_pipeline, "beta", 2)]
    base = base_weights(tiny_pipeline, sorted({p for c in concepts for p in c.deltas}))
    catalog = SimpleNamespace(fuse=FuseConfig(method="gradient", adapter_scale=SCALE), resolution=64, seed=0)
    return tiny_pipeline, concepts, base, catalog


def test_single_concept_reproduces_its_own_layer_outputs(setting):
    pipeline, concepts, base, catalog = setting
    fused, metrics = gradient_fuse(pipeline, catalog, SimpleNamespace(name="alpha"), concepts[:1], base)
    assert metrics["unet.objective"] < 1e-8 * metrics["unet.objective_at_base"]
    rest = [p for p in base if p.startswith("unet.") and ".attn2.to_k" not in p and ".attn2.to_v" not in p]
    _load_concept_weights(pipeline, base, concepts[0], SCALE, sorted(base))
    grams = capture_unet(pipeline, "alpha", rest, 64, 0)
    for path in rest:
        target = base[path] + SCALE * concepts[0].deltas[path]
        residual = (fused[path].double() - target.double()) @ grams[path]
        assert residual.norm() <= 1e-6 * (SCALE * concepts[0].deltas[path].double() @ grams[path]).norm(), path


def test_two_concepts_beat_weight_averaging_on_their_own_inputs(setting):
    pipeline, concepts, base, catalog = setting
    fused, metrics = gradient_fuse(pipeline, catalog, SimpleNamespace(name="alpha+beta"), concepts, base)
    assert set(fused) == set(base)
    averaged = average_fuse(base, concepts, SCALE)
    rest = [p for p in base if p.startswith("unet.") and ".attn2.to_k" not in p and ".attn2.to_v" not in p]
    grams = []
    for concept, name in zip(concepts, ("alpha", "beta")):
        _load_concept_weights(pipeline, base, concept, SCALE, sorted(base))
        grams.append(capture_unet(pipeline, name, rest, 64, 0))
    total_fused = total_average = 0.0
    for path in rest:
        deltas = [SCALE * c.deltas[path] for c in concepts]
        layer_grams = [g[path] for g in grams]
        total_fused += fusion_objective(fused[path], base[path], deltas, layer_grams)
        total_average += fusion_objective(averaged[path], base[path], deltas, layer_grams)
    assert total_fused < total_average
    assert metrics["unet.objective"] == pytest.approx(total_fused, rel=1e-6)
    # both concepts' tokens coexist in the fused text encoder
    vocab = pipeline.tokenizer.get_vocab()
    assert "<alpha1_l00>" in vocab and "<beta2_l06>" in vocab


def test_weight_averaging_counts_only_concepts_with_merged_updates():
    from conceptflow.adapters.effects import ConceptEffects, TextResidual

    base = {"unet.a": torch.zeros(2, 2)}
    lora = ConceptEffects({"name": "l"}, deltas={"unet.a": torch.ones(2, 2)})
    other = ConceptEffects({"name": "o"}, deltas={"unet.a": 3 * torch.ones(2, 2)})
    residual_only = ConceptEffects({"name": "r"}, text_residuals=[TextResidual("dog", torch.ones(4))])
    assert torch.equal(average_fuse(base, [lora, residual_only], 1.0)["unet.a"], torch.ones(2, 2))  # not halved
    assert torch.equal(average_fuse(base, [lora, other, residual_only], 1.0)["unet.a"], 2 * torch.ones(2, 2))
