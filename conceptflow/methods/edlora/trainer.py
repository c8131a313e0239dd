"""ED-LoRA (Mix-of-Show): layer-wise concept tokens + LoRA on text encoder and UNet attention.

Learning rates 1e-3 / 1e-5 / 1e-4 (embeddings / text encoder / UNet), rank 4, alpha a plain
multiplier, embedding updates stopped once their mean norm reaches 0.55, masked denoising loss.
"""

from __future__ import annotations

from typing import Mapping

import torch

from conceptflow.methods.base import ConceptTrainer
from conceptflow.methods.edlora.config import LoRATrainConfig
from conceptflow.methods.edlora.lora import (
    TEXT_ATTENTION_LINEARS,
    UNET_ATTENTION_LINEARS,
    add_lora,
    load_lora_state_dict,
    lora_state_dict,
)
from conceptflow.train.common import ConceptTrainingSetup, denoising_loss, sample_batch

MODEL_NAMES = ("unet", "text_encoder")


class EDLoRAMethod(ConceptTrainer):
    def __init__(self, setup: ConceptTrainingSetup, config: LoRATrainConfig, device: str = "cpu"):
        super().__init__(setup, config, device)
        add_lora(setup.unet, UNET_ATTENTION_LINEARS, config.rank, config.alpha)
        if config.train_text_encoder:
            add_lora(setup.text_encoder, TEXT_ATTENTION_LINEARS, config.rank, config.alpha)

    def _lora_parameters(self, model) -> list[torch.nn.Parameter]:
        return [p for name, p in model.named_parameters() if "lora_" in name]

    def method_parameter_groups(self) -> list[dict]:
        groups = [{"params": self._lora_parameters(self.setup.unet), "lr": self.config.lr_unet}]
        if self.config.train_text_encoder:
            groups.append({"params": self._lora_parameters(self.setup.text_encoder), "lr": self.config.lr_text_encoder})
        return groups

    def loss(self, step: int, generator: torch.Generator):
        batch = sample_batch(self.setup, self.config.batch_size, generator)
        text = self.setup.encode(batch.prompts)
        prediction = self.setup.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=text).sample
        loss = denoising_loss(prediction, batch, self.config.masked_loss)
        return loss, {"embedding_norm": self.setup.embeddings.mean_norm()}

    def method_state(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in lora_state_dict(self.setup.unet).items()}
        if self.config.train_text_encoder:
            state.update({f"text_encoder.{k}": v for k, v in lora_state_dict(self.setup.text_encoder).items()})
        return state

    def load_method_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for model_name in MODEL_NAMES:
            part = {k.removeprefix(f"{model_name}."): v for k, v in state.items() if k.startswith(f"{model_name}.")}
            if part:
                load_lora_state_dict(getattr(self.setup, model_name), part)

    def method_meta(self) -> dict:
        return {"rank": self.config.rank, "alpha": self.config.alpha,
                "unet_targets": list(UNET_ATTENTION_LINEARS),
                "text_encoder_targets": list(TEXT_ATTENTION_LINEARS) if self.config.train_text_encoder else []}
