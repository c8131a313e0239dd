"""Per-sample concept branches in one batched call, checked against applying each concept alone.

Concepts are built here from random ΔW / residuals / embeddings (no trained adapter). The
reference for a branch is a deep copy of the pipeline with the branch's concepts merged by
``apply_concepts``. Branched and merged differ only by float32 rounding (W0x + ΔWx against
(W0 + ΔW)x, and a branch's rows multiplied apart from the other rows): outputs are compared
with ``allclose(rtol=0, atol=ATOL)``. Without merging (``merge=False``: W0 x on every row, ΔW x
added on a branch's rows) the base branch's rows are bit for bit those of the same batch without
branches.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conceptflow.adapters.branched import branched_concepts, runtime_concepts
from conceptflow.adapters.concept_io import get_linear
from conceptflow.adapters.effects import ConceptEffects, TextResidual, TokenDelta
from conceptflow.adapters.merge import apply_concepts
from conceptflow.adapters.tokens import concept_token_strings, encode_layerwise
from conceptflow.errors import ConceptflowError

from conceptflow.attention.processor import attention_controller_of

ATOL = 1e-5  # float32, outputs O(1); measured differences are <= 1.6e-6

CROSS_V = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
CROSS_K = "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
DENSE_PATHS = (
    "unet.time_embedding.linear_1",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "text_encoder.text_model.encoder.layers.0.self_attn.v_proj",
    "text_encoder.text_model.encoder.layers.1.mlp.fc1",
)


@pytest.fixture(scope="module")
def pipeline(tiny_sd_path, one_torch_thread):
    from conceptflow.models.loading import load_base_pipeline

    loaded = load_base_pipeline("embedded:tiny-sd")
    attention_controller_of(loaded.unet)  # layer-wise (B, L, T, D) text
    return loaded


def random_delta(pipeline, path, seed, size=0.3):
    weight = get_linear(pipeline, path).weight.detach()
    generator = torch.Generator().manual_seed(seed)
    return size * weight.std() * torch.randn(weight.shape, generator=generator)


def dense_concept(pipeline, name, seed, paths=DENSE_PATHS):
    return ConceptEffects({"name": name}, deltas={p: random_delta(pipeline, p, seed + i) for i, p in enumerate(paths)})


def ids_of(pipeline, prompts):
    tokenizer = pipeline.tokenizer
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def latents(batch, seed=0):
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run(pipeline, prompts, sample, cfg=False):
    """Encode prompts (and empty prompts for CFG, in their own call) and run one UNet call."""
    text = pipeline.text_encoder(ids_of(pipeline, prompts))[0]
    if cfg:
        uncond = pipeline.text_encoder(ids_of(pipeline, [""] * len(prompts)))[0]
        text, sample = torch.cat([uncond, text]), torch.cat([sample, sample])
    return pipeline.unet(sample, torch.tensor(500), encoder_hidden_states=text).sample


def merged(pipeline, concepts):
    reference = copy.deepcopy(pipeline)
    apply_concepts(reference, list(concepts))
    return reference


def assert_close(actual, expected):
    difference = (actual - expected).abs().max().item()
    assert difference <= ATOL, f"max |difference| {difference:.3g} > {ATOL}"


PROMPTS = ["a photo of a dog", "a red star on sand", "a heart and a star"]


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "deltas"])
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
def test_three_branches_in_one_call_equal_each_concept_merged(pipeline, cfg, merge):
    a, b = dense_concept(pipeline, "a", 10), dense_concept(pipeline, "b", 20)
    x = latents(3)
    with branched_concepts(pipeline, [[], [a], [b]], branch_of=[0, 1, 2], merge=merge):
        out = run(pipeline, PROMPTS, x, cfg)
    out_base = run(pipeline, PROMPTS, x, cfg)
    for index, concepts in enumerate([[], [a], [b]]):
        reference = merged(pipeline, concepts)
        expected = run(reference, [PROMPTS[index]], x[index : index + 1], cfg)
        rows = [index, index + 3] if cfg else [index]
        assert_close(out[rows], expected)
        if concepts:  # the concept does change the sample
            assert (expected - out_base[rows]).abs().max() > 100 * ATOL
    if not merge:  # the base rows ran in the whole batch, through W0 only: exact
        assert torch.equal(out[[0, 3] if cfg else [0]], out_base[[0, 3] if cfg else [0]])


def test_two_concepts_in_one_branch_equal_both_merged(pipeline):
    a, b = dense_concept(pipeline, "a", 10), dense_concept(pipeline, "b", 20, DENSE_PATHS[2:6])
    x = latents(2, seed=1)
    with branched_concepts(pipeline, [[a, b], [b]], branch_of=[0, 1], scale=0.7):
        out = run(pipeline, PROMPTS[:2], x)
    both = copy.deepcopy(pipeline)
    apply_concepts(both, [a, b], scale=0.7)
    only_b = copy.deepcopy(pipeline)
    apply_concepts(only_b, [b], scale=0.7)
    assert_close(out[:1], run(both, PROMPTS[:1], x[:1]))
    assert_close(out[1:], run(only_b, PROMPTS[1:2], x[1:]))


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "deltas"])
def test_fused_weights_branch_equals_fused_model(pipeline, merge):
    fused_weights = {}
    for i, path in enumerate(DENSE_PATHS[:4]):
        fused_weights[path] = get_linear(pipeline, path).weight.detach() + random_delta(pipeline, path, 40 + i)
    fused = ConceptEffects({"name": "fused", "kind": "fused"}, weights=fused_weights)
    x = latents(2, seed=2)
    with branched_concepts(pipeline, [[fused], []], branch_of=[0, 1], scale=0.5, merge=merge):  # scale: not weights
        out = run(pipeline, PROMPTS[:2], x)
    assert_close(out[:1], run(merged(pipeline, [fused]), PROMPTS[:1], x[:1]))
    assert_close(out[1:], run(pipeline, PROMPTS[1:2], x[1:]))
    if not merge:  # the base branch, same batch: exact
        assert torch.equal(out[1:], run(pipeline, PROMPTS[:2], x)[1:])


def test_runtime_concepts_apply_to_every_sample(pipeline):
    a = dense_concept(pipeline, "a", 10)
    x = latents(2, seed=3)
    with runtime_concepts(pipeline, [a]):
        out = run(pipeline, PROMPTS[:2], x, cfg=True)
    assert_close(out, run(merged(pipeline, [a]), PROMPTS[:2], x, cfg=True))


# ---------------------------------------------------------------- token-position updates


def token_concept(pipeline, token="dog</w>", path=CROSS_V, seed=50):
    return ConceptEffects({"name": "tova"}, token_deltas={path: TokenDelta(random_delta(pipeline, path, seed, 1.0), (token,))})


def test_token_delta_equals_hand_merged_rows_of_one_linear(pipeline):
    concept = token_concept(pipeline)
    linear = get_linear(pipeline, CROSS_V)
    captured = {}

    def capture(module, inputs, output):
        captured["x"], captured["out"] = inputs[0].detach(), output.detach()

    prompts = ["a dog and a dog", "a cat"]
    with branched_concepts(pipeline, [[concept], [concept]], branch_of=[0, 1]):
        handle = linear.register_forward_hook(capture)  # runs after the branch hook
        try:
            run(pipeline, prompts, latents(2), cfg=True)
        finally:
            handle.remove()
    x, out = captured["x"], captured["out"]  # rows: [uncond 0, uncond 1, cond 0, cond 1]
    ids = torch.cat([ids_of(pipeline, [""] * 2), ids_of(pipeline, prompts)])
    at_token = ids == pipeline.tokenizer.get_vocab()["dog</w>"]
    assert at_token[2].sum() == 2 and at_token[[0, 1, 3]].sum() == 0
    delta = concept.token_deltas[CROSS_V].delta
    expected = F.linear(x, linear.weight, linear.bias)
    expected[at_token] = F.linear(x[at_token], linear.weight + delta, linear.bias)
    assert_close(out, expected)
    assert (out[2][at_token[2]] - F.linear(x[2][at_token[2]], linear.weight, linear.bias)).abs().max() > 100 * ATOL


def test_token_delta_has_no_effect_without_the_token(pipeline):
    concept = token_concept(pipeline)
    x = latents(2, seed=4)
    prompts = ["a red star on sand", "a dog on sand"]
    with branched_concepts(pipeline, [[concept], []], branch_of=[0, 0]):
        out = run(pipeline, prompts, x, cfg=True)
    base = run(pipeline, prompts, x, cfg=True)
    assert torch.equal(out[[0, 1, 2]], base[[0, 1, 2]])  # both uncond rows and the prompt without "dog"
    assert (out[3] - base[3]).abs().max() > 100 * ATOL


def test_token_delta_with_layerwise_tokens_found_automatically_or_given(pipeline):
    n_layers = len(pipeline.unet.attention_controller.cross_layers)
    generator = torch.Generator().manual_seed(5)
    embeddings = {t: 0.02 * torch.randn(32, generator=generator) for t in concept_token_strings("zz", n_layers)}
    layer_tokens = tuple(concept_token_strings("zz", n_layers))
    concept = ConceptEffects({"name": "zz"}, embeddings=embeddings, token_deltas={
        CROSS_V: TokenDelta(random_delta(pipeline, CROSS_V, 60, 1.0), layer_tokens[:2]),  # layer 0's tokens
        CROSS_K: TokenDelta(random_delta(pipeline, CROSS_K, 61, 1.0), layer_tokens),
    })
    prompts = ["a photo of <zz>", "a star"]
    x = latents(2, seed=6)

    def layerwise_unet(handle=None):
        with torch.no_grad():
            text = encode_layerwise(prompts, pipeline.tokenizer, pipeline.text_encoder, n_layers, ["zz"])
            uncond = encode_layerwise([""] * 2, pipeline.tokenizer, pipeline.text_encoder, n_layers)
            return pipeline.unet(torch.cat([x, x]), torch.tensor(300), encoder_hidden_states=torch.cat([uncond, text])).sample

    with branched_concepts(pipeline, [[concept], []], branch_of=[0, 1]) as handle:
        automatic = layerwise_unet()
        with_tokens_only = ConceptEffects({"name": "zz"}, embeddings=embeddings)
        variants = [p.replace("<zz>", f"{layer_tokens[2 * l]} {layer_tokens[2 * l + 1]}") for p in prompts for l in range(n_layers)]
        cond_ids = ids_of(pipeline, variants).view(2, n_layers, -1)
        uncond_ids = ids_of(pipeline, [""] * 2).unsqueeze(1).expand(-1, n_layers, -1)
        handle.set_token_ids(torch.cat([uncond_ids, cond_ids]))
        given = layerwise_unet()
        handle.set_token_ids(ids_of(pipeline, prompts))  # wrong row count for the CFG batch
        with pytest.raises(ConceptflowError, match="rows for a UNet call"):
            layerwise_unet()
    assert torch.equal(automatic, given)
    with branched_concepts(pipeline, [[with_tokens_only], []], branch_of=[0, 1]):
        tokens_alone = layerwise_unet()
    assert torch.equal(automatic[[0, 1, 3]], tokens_alone[[0, 1, 3]])  # only the row with <zz> changes
    assert (automatic[2] - tokens_alone[2]).abs().max() > 100 * ATOL


def test_unmatched_conditioning_is_refused(pipeline):
    concept = token_concept(pipeline)
    with branched_concepts(pipeline, [[concept]]):
        with pytest.raises(ConceptflowError, match="set_token_ids"):
            with torch.no_grad():
                pipeline.unet(latents(1), torch.tensor(1), encoder_hidden_states=torch.randn(1, 77, 32))


def test_text_encoder_token_delta_uses_the_ids_of_its_call(pipeline):
    path = "text_encoder.text_model.encoder.layers.1.self_attn.v_proj"
    concept = token_concept(pipeline, path=path, seed=70)
    prompts = ["a dog", "a star"]
    with torch.no_grad():
        base = pipeline.text_encoder(ids_of(pipeline, prompts))[0]
        with runtime_concepts(pipeline, [concept]):
            out = pipeline.text_encoder(ids_of(pipeline, prompts))[0]
    dog = (ids_of(pipeline, ["a dog"])[0] == pipeline.tokenizer.get_vocab()["dog</w>"]).nonzero().item()
    assert torch.equal(out[1], base[1]) and torch.equal(out[0, :dog], base[0, :dog])  # causal: before the token
    assert (out[0, dog:] - base[0, dog:]).abs().max() > 1e-3


# ---------------------------------------------------------------- text residuals


def test_text_residual_is_added_exactly_at_the_token(pipeline):
    vector = torch.randn(32, generator=torch.Generator().manual_seed(7))
    concept = ConceptEffects({"name": "cones"}, text_residuals=[TextResidual("dog", vector)])  # "dog" -> dog</w>
    prompts = ["a dog next to a dog", "a dog", "a star"]
    ids = ids_of(pipeline, prompts)
    with torch.no_grad():
        base = pipeline.text_encoder(ids)[0]
        with branched_concepts(pipeline, [[concept], [], [concept]], branch_of=[0, 1, 2]):
            out = pipeline.text_encoder(ids)[0]
            layerwise = pipeline.text_encoder(ids.repeat_interleave(2, dim=0))[0]  # prompt-major layer variants
    at_token = ids == pipeline.tokenizer.get_vocab()["dog</w>"]
    at_token[1] = False  # sample 1 is the base branch
    assert at_token[0].sum() == 2 and at_token.sum() == 2
    difference = out - base
    assert torch.equal(difference[~at_token], torch.zeros_like(difference[~at_token]))
    assert_close(difference[at_token], vector.expand(2, -1))
    assert torch.equal(layerwise, out.repeat_interleave(2, dim=0))


def test_residual_concept_cannot_be_merged(pipeline):
    concept = ConceptEffects({"name": "cones"}, text_residuals=[TextResidual("dog", torch.zeros(32))])
    with pytest.raises(ConceptflowError, match="branched"):
        apply_concepts(copy.deepcopy(pipeline), [concept])


# ---------------------------------------------------------------- the pipeline afterwards


def snapshot(pipeline):
    tensors = {}
    for model in ("unet", "text_encoder", "vae"):
        for key, value in getattr(pipeline, model).state_dict().items():
            tensors[f"{model}.{key}"] = value.detach().clone()
    modules = {model: [(n, id(m)) for n, m in getattr(pipeline, model).named_modules()] for model in ("unet", "text_encoder")}
    return tensors, modules, len(pipeline.tokenizer)


def hook_count(pipeline):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               for model in ("unet", "text_encoder") for m in getattr(pipeline, model).modules())


def test_pipeline_is_untouched_after_exit(pipeline):
    before, hooks_before = snapshot(pipeline), hook_count(pipeline)
    existing = "sks</w>"  # an existing vocabulary entry overwritten by a concept's embedding: restored on exit
    assert existing in pipeline.tokenizer.get_vocab()
    every_channel = ConceptEffects(
        {"name": "all"}, embeddings={existing: torch.ones(32)},
        deltas={p: random_delta(pipeline, p, 80 + i) for i, p in enumerate(DENSE_PATHS)},
        weights={CROSS_K: torch.zeros_like(get_linear(pipeline, CROSS_K).weight)},
        token_deltas={CROSS_V: TokenDelta(random_delta(pipeline, CROSS_V, 90), ("dog",))},
        text_residuals=[TextResidual("dog", torch.ones(32))],
    )
    def replaced_forwards():  # merge mode replaces the adapted linears' forward inside the block
        return sum("forward" in vars(m) for model in ("unet", "text_encoder") for m in getattr(pipeline, model).modules())

    with branched_concepts(pipeline, [[every_channel], []], branch_of=[0, 1]):
        assert hook_count(pipeline) > hooks_before and replaced_forwards() == len(DENSE_PATHS) + 1
        run(pipeline, ["a sks dog", "a dog"], latents(2), cfg=True)
    assert replaced_forwards() == 0
    with pytest.raises(RuntimeError, match="inside"):
        with branched_concepts(pipeline, [[every_channel]]):
            raise RuntimeError("inside the block")
    after = snapshot(pipeline)
    assert after[1:] == before[1:] and hook_count(pipeline) == hooks_before
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][key], value) for key, value in before[0].items())


def test_batch_rules_are_enforced(pipeline):
    a = dense_concept(pipeline, "a", 10)
    with branched_concepts(pipeline, [[], [a]]) as handle:
        with pytest.raises(ConceptflowError, match="set_branches"):
            run(pipeline, PROMPTS[:2], latents(2))
        handle.set_branches([0, 1])
        with pytest.raises(ConceptflowError, match="multiple"):
            run(pipeline, PROMPTS, latents(3))
        with pytest.raises(ConceptflowError, match="outside"):
            handle.set_branches([0, 2])


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("order", [[0, 0, 1, 1, 2, 2], [1, 0, 1, 2, 1, 0]], ids=["sorted", "interleaved"])
def test_merged_rows_by_runs_or_gathers_equal_each_concept_merged(pipeline, order, grad):
    """Samples sorted by branch run each branch's linears on contiguous slices (in place without
    autograd, concatenated with it); interleaved ones gather their rows: same outputs and gradients."""
    a, b = dense_concept(pipeline, "a", 10), dense_concept(pipeline, "b", 20)
    branches = [[], [a], [b]]
    prompts = [PROMPTS[i % 3] for i in range(len(order))]
    x = latents(len(order), seed=3)

    def output_and_grad(model, prompts, sample):
        sample = sample.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            text = model.text_encoder(ids_of(model, prompts))[0]
            out = model.unet(sample, torch.tensor(500), encoder_hidden_states=text).sample
            gradient = torch.autograd.grad(out.square().sum(), sample)[0] if grad else None
        return out.detach(), gradient

    with branched_concepts(pipeline, branches, branch_of=order) as handle:
        out, gradient = output_and_grad(pipeline, prompts, x)
        call_runs = handle._groups("unet", len(order), x.device)[1]
    assert (call_runs is not None) == (order == sorted(order))
    references = [merged(pipeline, concepts) for concepts in branches]
    for index, branch in enumerate(order):
        expected, expected_grad = output_and_grad(references[branch], prompts[index:index + 1], x[index:index + 1])
        assert_close(out[index:index + 1], expected)
        if grad:
            assert_close(gradient[index:index + 1], expected_grad)


def test_cross_attention_projections_of_an_unchanged_conditioning_are_reused(pipeline):
    """The text conditioning's keys/values are projected once per conditioning tensor: a second
    UNet call with it equals the first without projecting again; editing it in place, passing another
    tensor or reassigning branches projects anew, and each result equals a fresh computation."""
    a, b = dense_concept(pipeline, "a", 10), dense_concept(pipeline, "b", 20)
    x = latents(2, seed=4)
    text = pipeline.text_encoder(ids_of(pipeline, PROMPTS[:2]))[0].detach()
    timestep = torch.tensor(500)

    def fresh(branch_of, context):
        with branched_concepts(pipeline, [[a], [b]], branch_of=branch_of):
            return pipeline.unet(x, timestep, encoder_hidden_states=context).sample

    key_paths = [n for n, m in pipeline.unet.named_modules() if n.endswith("attn2.to_k")]
    with torch.no_grad(), branched_concepts(pipeline, [[a], [b]], branch_of=[0, 1]) as handle:
        plan = handle._plans[f"unet.{key_paths[0]}"]
        first = pipeline.unet(x, timestep, encoder_hidden_states=text).sample
        second = pipeline.unet(x, timestep, encoder_hidden_states=text).sample
        assert torch.equal(first, second) and len(plan.reused) == 1
        reused_output = next(iter(plan.reused.values()))[1]
        assert pipeline.unet(x + 1, timestep, encoder_hidden_states=text).sample.shape == first.shape
        assert next(iter(plan.reused.values()))[1] is reused_output  # latents changed, text did not: reused
        edited = text.clone()
        changed = pipeline.unet(x, timestep, encoder_hidden_states=edited).sample
        assert torch.equal(changed, first) and len(plan.reused) == 2  # another tensor: projected anew
        edited.mul_(0.5)
        halved = pipeline.unet(x, timestep, encoder_hidden_states=edited).sample
        assert len(plan.reused) == 3  # edited in place: a new version, projected anew
        handle.set_branches([1, 0])
        swapped = pipeline.unet(x, timestep, encoder_hidden_states=text).sample
        assert len(plan.reused) == 4
    with torch.no_grad():
        assert_close(first, fresh([0, 1], text))
        assert_close(halved, fresh([0, 1], text * 0.5))
        assert_close(swapped, fresh([1, 0], text))
    assert not torch.equal(swapped, first)
