"""Extended textual inversion: only the concept's layer-wise token embeddings are trained.

The same tokens as ED-LoRA (``<name1>``, ``<name2>`` with one embedding per cross-attention
layer, P+'s "extended" space) and the same masked denoising loss; the UNet and the text
encoder stay frozen, so the concept is a few KB of embeddings and composes with any other
concept without fusion.
"""

from __future__ import annotations

from typing import Mapping

import torch

from conceptflow.methods.base import ConceptTrainer
from conceptflow.train.common import denoising_loss, sample_batch


class TextualInversionMethod(ConceptTrainer):
    def method_parameter_groups(self) -> list[dict]:
        return []

    def loss(self, step: int, generator: torch.Generator):
        batch = sample_batch(self.setup, self.config.batch_size, generator)
        text = self.setup.encode(batch.prompts)
        prediction = self.setup.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=text).sample
        return denoising_loss(prediction, batch, self.config.masked_loss), {
            "embedding_norm": self.setup.embeddings.mean_norm()}

    def method_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_method_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"textual inversion has no tensors besides its embeddings, got {sorted(state)[:3]}")
