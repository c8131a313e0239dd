"""The hooked attention processor: same numbers as diffusers' when idle; layer-wise text; maps."""

import torch

from conceptflow.attention.processor import AttentionHook, CrossAttentionMapRecorder, install_attention_controller


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
    install_attention_controller(unet)
    with torch.no_grad():
        hooked = unet(latents, timesteps, encoder_hidden_states=text).sample
    torch.testing.assert_close(hooked, reference, rtol=0, atol=1e-6)


def test_probs_path_equals_sdpa_path(tiny_pipeline):
    unet = tiny_pipeline.unet
    controller = install_attention_controller(unet)
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
    controller = install_attention_controller(unet)
    n_layers = len(controller.cross_layers)
    latents, timesteps, text = unet_inputs(unet)
    layerwise = text.unsqueeze(1).repeat(1, n_layers, 1, 1)
    with torch.no_grad():
        plain = unet(latents, timesteps, encoder_hidden_states=text).sample
        same = unet(latents, timesteps, encoder_hidden_states=layerwise).sample
        torch.testing.assert_close(same, plain, rtol=0, atol=0)

        seen = {}

        class Spy(AttentionHook):
            def edit_value(self, layer, query, key, value):
                if layer.is_cross:
                    seen[layer.cross_index] = key.detach().clone()
                return value

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
    controller = install_attention_controller(unet)
    latents, timesteps, text = unet_inputs(unet)

    class ZeroSelfValues(AttentionHook):
        def edit_value(self, layer, query, key, value):
            return torch.zeros_like(value) if not layer.is_cross else value

    with torch.no_grad():
        plain = unet(latents, timesteps, encoder_hidden_states=text).sample
        with controller.use(ZeroSelfValues()):
            edited = unet(latents, timesteps, encoder_hidden_states=text).sample
        after = unet(latents, timesteps, encoder_hidden_states=text).sample
    assert not torch.allclose(plain, edited)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # hooks leave with the `with` block
