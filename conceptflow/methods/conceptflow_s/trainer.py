"""ConceptFlow-S (§4.1, A.1, A.2.2): ED-LoRA's layer-wise tokens with a KronA-WED UNet adapter,
DisenBooth's disentangled learning and the attention regularisation of Eq. 5.

One training step, for a batch of noised training latents z_t and captions with ``<name>``:

    f_s  = text features of the caption (layer-wise, the concept's tokens trainable)
    f_i  = ImageAdapter(CLIP image embedding of the image)              (Eq. 21)
    L    = L_denoise(f_s + f_i)                                         (Eq. 22)
         + λ_w · L_denoise(f_s)                                         (Eq. 23, the "weak" pass)
         + λ_con · cos(f_s, f_i)                                        (Eq. 24)
         + λ_attn · ½(‖CA(V_rand)⊙(1−M)‖² + ‖CA(V_class)−M‖²)           (Eq. 5, weak pass only)

with f_i added to every text token (DisenBooth). λ_w = λ_con = λ_attn = 0.001 (A.2.2;
DisenBooth itself uses λ_w = 0.01). V_rand / V_class are the concept's two tokens
``<name1>`` (random init, the "adjective") and ``<name2>`` (class-word init, the "noun");
CA is each token's cross-attention map averaged over heads and all cross-attention layers,
resized to the latent mask, read through the project's attention hooks.

Trained: the concept's token embeddings (lr 1e-3, frozen once their mean norm reaches 0.55
as in ED-LoRA), KronA-WED A, B and m on every linear of every UNet attention module
(lr 5e-4), and the image adapter (lr 1e-3). The base UNet, text encoder, VAE and the CLIP
image encoder stay frozen; the image adapter is only a training device and is not used
when sampling.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from conceptflow.adapters.tokens import token_positions
from conceptflow.attention.processor import CrossAttentionMapRecorder
from conceptflow.errors import ConceptflowError
from conceptflow.methods.base import ConceptTrainer
from conceptflow.methods.conceptflow_s.config import ConceptFlowSTrainConfig
from conceptflow.methods.conceptflow_s.image_adapter import ImageAdapter, clip_image_embeddings
from conceptflow.methods.conceptflow_s.krona_wed import (
    KronaWEDLinear,
    inject_krona_wed,
    krona_wed_state_dict,
    load_krona_wed_state_dict,
)
from conceptflow.methods.conceptflow_s.losses import attention_regularisation_loss, disentangle_cosine
from conceptflow.train.common import ConceptTrainingSetup, denoising_loss, sample_batch

UNET_PREFIX = "unet."
IMAGE_ADAPTER_PREFIX = "image_adapter."


class ConceptFlowSMethod(ConceptTrainer):
    """The ConceptFlow-S ``TrainingMethod`` for ``run_training`` (see the module docstring).

    Args:
        setup: the prepared concept (pipeline, layer tokens, latents, masks, PIL images).
        config: the catalog's ``ConceptFlowSTrainConfig``.
        device: where the image adapter and the CLIP image features live (the pipeline's device).
    """

    def __init__(self, setup: ConceptTrainingSetup, config: ConceptFlowSTrainConfig, device: str = "cpu"):
        super().__init__(setup, config, device)
        self.krona_modules = inject_krona_wed(setup.unet, factor=config.kron_factor,
                                              weight_decompose=config.weight_decompose)
        # Frozen encoder, run once: the training images never change during a run.
        self.image_embeddings = clip_image_embeddings(setup.pixel_images, config.image_encoder, device)
        text_dim = setup.text_encoder.config.hidden_size
        self.image_adapter = ImageAdapter(self.image_embeddings.shape[1], text_dim).to(device)
        self._positions: dict[str, list[int]] = {}

    # --- TrainingMethod -------------------------------------------------------------------

    def method_parameter_groups(self) -> list[dict]:
        adapter_parameters = [p for module in self.krona_modules.values() for p in self._krona_parameters(module)]
        return [
            {"params": adapter_parameters, "lr": self.config.lr_adapter},
            {"params": list(self.image_adapter.parameters()), "lr": self.config.lr_image_adapter},
        ]

    def loss(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        setup, config = self.setup, self.config
        batch = sample_batch(setup, config.batch_size, generator)
        text = setup.encode(batch.prompts)  # f_s: (B, layers, tokens, D)
        image = self.image_adapter(self.image_embeddings[batch.indices.to(self.image_embeddings.device)])  # f_i
        with_image = text + image.to(text.dtype)[:, None, None, :]  # f_i added to every token of every layer

        prediction = setup.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=with_image).sample
        loss_denoise = denoising_loss(prediction, batch, config.masked_loss)

        # The weak (text-only) pass is the one whose cross-attention maps Eq. 5 regularises.
        recorder = CrossAttentionMapRecorder(self._token_positions(batch.prompts), keep_graph=True)
        with setup.controller.use(recorder):
            text_prediction = setup.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=text).sample
        loss_text_only = denoising_loss(text_prediction, batch, config.masked_loss)
        maps = recorder.mean_map(batch.masks.shape[-1])  # (B, 2, h, w): V_rand, V_class
        loss_attention = attention_regularisation_loss(maps[:, 0], maps[:, 1], batch.masks[:, 0],
                                                       config.attention_loss_reduction)
        recorder.clear()
        loss_cosine = disentangle_cosine(text, image)

        loss = (loss_denoise + config.weight_text_only * loss_text_only
                + config.weight_disentangle * loss_cosine + config.weight_attention * loss_attention)
        logs = {"loss_denoise": float(loss_denoise.detach()), "loss_text_only": float(loss_text_only.detach()),
                "cosine": float(loss_cosine.detach()), "loss_attention": float(loss_attention.detach()),
                "embedding_norm": setup.embeddings.mean_norm()}
        return loss, logs

    def method_state(self) -> dict[str, torch.Tensor]:
        state = {f"{UNET_PREFIX}{k}": v for k, v in krona_wed_state_dict(self.krona_modules).items()}
        state.update({f"{IMAGE_ADAPTER_PREFIX}{k}": v.detach() for k, v in self.image_adapter.state_dict().items()})
        return state

    def load_method_state(self, state: Mapping[str, torch.Tensor]) -> None:
        unet_part = {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
        load_krona_wed_state_dict(self.setup.unet, unet_part, weight_decompose=self.config.weight_decompose)
        image_part = {k.removeprefix(IMAGE_ADAPTER_PREFIX): v for k, v in state.items()
                      if k.startswith(IMAGE_ADAPTER_PREFIX)}
        self.image_adapter.load_state_dict(image_part)

    def method_meta(self) -> dict:
        """The method's part of ``concept.json``. Its tensors: ``unet.<path>.kron_a|kron_b|magnitude``
        (m of ``out`` values with ``weight_decompose`` "rows", of ``in`` values with "columns")
        and ``image_adapter.<name>`` (kept for inspection and further training; sampling ignores it).
        ``weight_decompose`` is written for "columns" only: absent means "rows" (as in files from
        before the setting), which keeps a row-norm concept's concept.json as it was."""
        axis = {} if self.config.weight_decompose == "rows" else {"weight_decompose": self.config.weight_decompose}
        return {"adapter": "krona_wed", "kron_factor": self.config.kron_factor, **axis,
                "unet_targets": sorted(self.krona_modules), "image_encoder": self.config.image_encoder,
                "image_adapter": {"image_dim": self.image_adapter.image_dim, "text_dim": self.image_adapter.text_dim}}

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _krona_parameters(module: KronaWEDLinear) -> list[nn.Parameter]:
        return [module.kron_a, module.kron_b, module.magnitude]

    def _token_positions(self, prompts: list[str]) -> torch.Tensor:
        """(B, 2) positions of ``<name1>`` (V_rand) and ``<name2>`` (V_class) in each prompt.

        Every layer's tokens are single added tokens at the same places, so layer 0's
        positions hold for all cross-attention layers.
        """
        rows = []
        for prompt in prompts:
            if prompt not in self._positions:
                positions = token_positions(prompt, self.setup.tokenizer, self.setup.concept_name, 0)
                if len(positions) != 2:
                    raise ConceptflowError(
                        f"caption {prompt!r} must hold the concept's two tokens once (found {len(positions)}); "
                        "use one <name> per caption")
                self._positions[prompt] = positions
            rows.append(self._positions[prompt])
        return torch.tensor(rows, dtype=torch.long)
