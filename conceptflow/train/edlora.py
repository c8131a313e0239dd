"""ED-LoRA (Mix-of-Show): layer-wise concept tokens + LoRA on text encoder and UNet attention.

Learning rates 1e-3 / 1e-5 / 1e-4 (embeddings / text encoder / UNet), rank 4, alpha a plain
multiplier, embedding updates stopped once their mean norm reaches 0.55, masked denoising loss.
"""

from __future__ import annotations

import torch

from conceptflow.adapters.concept_io import EMBEDDING_PREFIX
from conceptflow.adapters.lora import (
    TEXT_ATTENTION_LINEARS,
    UNET_ATTENTION_LINEARS,
    add_lora,
    lora_deltas,
    lora_state_dict,
    load_lora_state_dict,
)
from conceptflow.config import LoRATrainConfig
from conceptflow.train.common import ConceptTrainingSetup, denoising_loss, freeze_embeddings_at_norm, sample_batch


class EDLoRAMethod:
    def __init__(self, setup: ConceptTrainingSetup, config: LoRATrainConfig):
        self.setup, self.config = setup, config
        add_lora(setup.unet, UNET_ATTENTION_LINEARS, config.rank, config.alpha)
        if config.train_text_encoder:
            add_lora(setup.text_encoder, TEXT_ATTENTION_LINEARS, config.rank, config.alpha)

    def _lora_parameters(self, model) -> list[torch.nn.Parameter]:
        return [p for name, p in model.named_parameters() if "lora_" in name]

    def parameter_groups(self) -> list[dict]:
        groups = [
            {"params": [self.setup.embeddings.weight], "lr": self.config.lr_embeddings},
            {"params": self._lora_parameters(self.setup.unet), "lr": self.config.lr_unet},
        ]
        if self.config.train_text_encoder:
            groups.append({"params": self._lora_parameters(self.setup.text_encoder), "lr": self.config.lr_text_encoder})
        return groups

    def loss(self, step: int, generator: torch.Generator):
        batch = sample_batch(self.setup, self.config.batch_size, generator)
        text = self.setup.encode(batch.prompts)
        prediction = self.setup.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=text).sample
        loss = denoising_loss(prediction, batch, self.config.masked_loss)
        return loss, {"embedding_norm": self.setup.embeddings.mean_norm()}

    def after_step(self) -> None:
        freeze_embeddings_at_norm(self.setup.embeddings, self.config.embedding_norm_limit)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {"embeddings": self.setup.embeddings.weight.detach()}
        state.update({f"unet.{k}": v for k, v in lora_state_dict(self.setup.unet).items()})
        if self.config.train_text_encoder:
            state.update({f"text_encoder.{k}": v for k, v in lora_state_dict(self.setup.text_encoder).items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.setup.embeddings.weight.copy_(state["embeddings"])
        for model_name in ("unet", "text_encoder"):
            part = {k.removeprefix(f"{model_name}."): v for k, v in state.items() if k.startswith(f"{model_name}.")}
            if part:
                load_lora_state_dict(getattr(self.setup, model_name), part)

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors for ``adapter.safetensors`` and the method's part of ``concept.json``."""
        state = self.trainable_state()
        tensors = {f"{EMBEDDING_PREFIX}{token}": row for token, row in zip(self.setup.token_strings, state.pop("embeddings"))}
        tensors.update(state)
        return tensors, {"rank": self.config.rank, "alpha": self.config.alpha,
                         "unet_targets": list(UNET_ATTENTION_LINEARS),
                         "text_encoder_targets": list(TEXT_ATTENTION_LINEARS) if self.config.train_text_encoder else []}


def edlora_deltas(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Merged updates ``{"unet.<path>" | "text_encoder.<path>": alpha * B @ A}`` of a saved ED-LoRA."""
    deltas = {}
    for model_name in ("unet", "text_encoder"):
        part = {k.removeprefix(f"{model_name}."): v for k, v in tensors.items() if k.startswith(f"{model_name}.")}
        deltas.update({f"{model_name}.{path}": delta for path, delta in lora_deltas(part, meta["alpha"]).items()})
    return deltas
