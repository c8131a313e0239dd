"""The hooked attention processor: same numbers as diffusers' when idle; layer-wise text; maps."""

import torch

from conceptflow.attention.processor import AttentionHook, CrossAttentionMapRecorder, attention_controller_of


def unet_inputs(unet, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([10, 500]), text


def test_idle_processor_equals_diffusers(tiny_pipeline):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = tiny_pipeline.unet
    latents, timesteps, text = unet_inputs(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        reference = unet(latents, timesteps, encoder_hidden_states=text).sample
    attention_controller_of(unet)
    with torch.no_grad():
        hooked = unet(latents, timesteps, encoder_hidden_states=text).sample
    torch.testing.assert_close(hooked, reference, rtol=0, atol=1e-6)


def test_probs_path_equals_sdpa_path(tiny_pipeline):
    unet = tiny_pipeline.unet
    controller = attention_controller_of(unet)
    latents, timesteps, text = unet_inputs(unet)
    with torch.no_grad():
        fast = unet(latents, timesteps, encoder_hidden_states=text).sample
        recorder = CrossAttentionMapRecorder(torch.tensor([1, 2]))
        with controller.use(recorder):
            explicit = unet(latents, timesteps, encoder_hidden_states=text).sample
    torch.testing.assert_close(explicit, fast, rtol=1e-5, atol=1e-5)
    assert set(recorder.maps) == {layer.name for layer in controller.cross_layers}
    maps = recorder.mean_map(16)
    assert maps.shape == (2, 2, 16, 16) and (maps >= 0).all()


def test_each_cross_layer_reads_its_own_text(tiny_pipeline):
    unet = tiny_pipeline.unet
    controller = attention_controller_of(unet)
    n_layers = controller.n_cross_layers
    latents, timesteps, text = unet_inputs(unet)
    layerwise = text.unsqueeze(1).repeat(1, n_layers, 1, 1)
    with torch.no_grad():
        plain = unet(latents, timesteps, encoder_hidden_states=text).sample
        same = unet(latents, timesteps, encoder_hidden_states=layerwise).sample
        torch.testing.assert_close(same, plain, rtol=0, atol=0)

        seen = {}

        class Spy(AttentionHook):
            def edit_key_value(self, layer, query, key, value, context):
                if layer.is_cross:
                    seen[layer.cross_index] = key.detach().clone()
                return key, value

        changed = layerwise.clone()
        changed[:, 3] += 1.0
        with controller.use(Spy()):
            unet(latents, timesteps, encoder_hidden_states=changed)
        baseline = dict(seen)
        with controller.use(Spy()):
            unet(latents, timesteps, encoder_hidden_states=layerwise)
    # cross-attention keys come from the text alone: only layer 3 saw the perturbed slice
    assert not torch.allclose(baseline[3], seen[3])
    for index in set(seen) - {3}:
        torch.testing.assert_close(baseline[index], seen[index], rtol=0, atol=0)


def test_value_edit_and_output_hooks_apply(tiny_pipeline):
    unet = tiny_pipeline.unet
    controller = attention_controller_of(unet)
    latents, timesteps, text = unet_inputs(unet)

    class ZeroSelfValues(AttentionHook):
        def edit_key_value(self, layer, query, key, value, context):
            return key, (torch.zeros_like(value) if not layer.is_cross else value)

    with torch.no_grad():
        plain = unet(latents, timesteps, encoder_hidden_states=text).sample
        with controller.use(ZeroSelfValues()):
            edited = unet(latents, timesteps, encoder_hidden_states=text).sample
        after = unet(latents, timesteps, encoder_hidden_states=text).sample
    assert not torch.allclose(plain, edited)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # hooks leave with the `with` block


# ------------------------------------------------------------ the hook points on one tiny attention layer
def tiny_cross_attention():
    """One diffusers cross-attention layer (2 heads of 4) with the hooked processor, and its controller."""
    from diffusers.models.attention_processor import Attention

    from conceptflow.attention.processor import AttentionController, AttentionLayer, HookedAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    layer = AttentionLayer("mid_block.attentions.0.transformer_blocks.0.attn2", True, 0, "mid_block", 0)
    controller = AttentionController([layer])
    attn.set_processor(HookedAttnProcessor(layer, controller))
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=generator)  # (B, Q, C)
    context = torch.randn(2, 4, 6, generator=generator)  # (B, K tokens, C_text)
    return attn, controller, hidden, context


def by_hand(attn, hidden, key, value):
    """softmax(q kᵀ / sqrt(d)) v for keys/values (B, heads, K, d), then the output projection."""
    batch, queries, _ = hidden.shape
    query = attn.to_q(hidden).view(batch, queries, attn.heads, -1).transpose(1, 2)
    probs = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(dim=-1)
    out = (probs @ value).transpose(1, 2).reshape(batch, queries, -1)
    return attn.to_out[0](out)


def heads(attn, tensor):
    return tensor.view(tensor.shape[0], tensor.shape[1], attn.heads, -1).transpose(1, 2)


class CountSdpa:
    """Counts calls of F.scaled_dot_product_attention (the fast path)."""

    def __init__(self, monkeypatch):
        import torch.nn.functional as F

        self.calls, original = 0, F.scaled_dot_product_attention

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", counting)


def test_identity_edits_change_nothing_bit_for_bit(monkeypatch):
    attn, controller, hidden, context = tiny_cross_attention()

    class IdentityKeyValue(AttentionHook):
        def edit_key_value(self, layer, query, key, value, context):
            return key, value

    class IdentityScores(AttentionHook):
        def edit_scores(self, layer, scores):
            return scores

    sdpa = CountSdpa(monkeypatch)
    with torch.no_grad():
        fast = attn(hidden, encoder_hidden_states=context)
        with controller.use(IdentityKeyValue()):
            fast_with_identity = attn(hidden, encoder_hidden_states=context)
        assert sdpa.calls == 2  # a key/value hook keeps the fast path
        recorder = CrossAttentionMapRecorder(torch.tensor([0, 1]))
        with controller.use(recorder):
            materialised = attn(hidden, encoder_hidden_states=context)
        with controller.use(IdentityScores()):
            with_identity_scores = attn(hidden, encoder_hidden_states=context)
        assert sdpa.calls == 2  # overriding edit_scores materialises the scores
    assert torch.equal(fast_with_identity, fast)
    assert torch.equal(with_identity_scores, materialised)
    torch.testing.assert_close(materialised, fast, rtol=0, atol=1e-6)


def test_large_negative_score_bias_removes_that_keys_contribution():
    attn, controller, hidden, context = tiny_cross_attention()

    class DropToken(AttentionHook):
        def __init__(self, token):
            self.token = token

        def edit_scores(self, layer, scores):
            bias = torch.zeros(scores.shape[-1])
            bias[self.token] = -1e9
            return scores + bias

    class OnlyOtherLayers(DropToken):
        def wants_scores(self, layer):
            return layer.name != "mid_block.attentions.0.transformer_blocks.0.attn2"

    with torch.no_grad():
        with controller.use(DropToken(2)):
            dropped = attn(hidden, encoder_hidden_states=context)
        without_token = attn(hidden, encoder_hidden_states=context[:, [0, 1, 3]])
        with controller.use(OnlyOtherLayers(2)):
            untouched = attn(hidden, encoder_hidden_states=context)
        plain = attn(hidden, encoder_hidden_states=context)
    torch.testing.assert_close(dropped, without_token, rtol=0, atol=1e-6)
    assert not torch.allclose(dropped, plain, atol=1e-3)
    assert torch.equal(untouched, plain)  # wants_scores False: no edit in that layer


def test_value_update_at_one_token_matches_the_hand_computed_attention():
    attn, controller, hidden, context = tiny_cross_attention()
    delta = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(2))  # (B, heads, d)
    seen = {}

    class ValueAtToken(AttentionHook):  # ToVA's shape: update V only at a concept token's position
        def edit_key_value(self, layer, query, key, value, context):
            seen["context"] = context
            value = value.clone()
            value[:, :, 1] += delta
            return key, value

    with torch.no_grad():
        with controller.use(ValueAtToken()):
            edited = attn(hidden, encoder_hidden_states=context)
        key, value = heads(attn, attn.to_k(context)), heads(attn, attn.to_v(context))
        value[:, :, 1] += delta
        expected = by_hand(attn, hidden, key, value)
    assert torch.equal(seen["context"], context)  # the hook sees the text its keys/values came from
    torch.testing.assert_close(edited, expected, rtol=0, atol=1e-6)


def test_key_edit_moves_attention_like_swapping_the_token():
    attn, controller, hidden, context = tiny_cross_attention()

    class CopyToken(AttentionHook):  # token 3 takes token 0's key and value
        def edit_key_value(self, layer, query, key, value, context):
            key, value = key.clone(), value.clone()
            key[:, :, 3], value[:, :, 3] = key[:, :, 0], value[:, :, 0]
            return key, value

    swapped = context.clone()
    swapped[:, 3] = context[:, 0]
    with torch.no_grad():
        with controller.use(CopyToken()):
            edited = attn(hidden, encoder_hidden_states=context)
        expected = attn(hidden, encoder_hidden_states=swapped)
    torch.testing.assert_close(edited, expected, rtol=0, atol=1e-6)
