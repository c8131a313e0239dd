"""Cones 2: fine-tune the text encoder on the concept, keep the residual at its class word.

As ``train_cones2.py``: every text-encoder parameter is trained (AdamW, lr 5e-6, weight decay
1e-2), the UNet and VAE stay frozen, the prompt is the class word alone and the loss is the
plain denoising MSE plus the embedding regulariser (``residual.embedding_regulariser``). The
concept has no tokens of its own (the setup's layer tokens are unhooked and not trained). The
checkpoint holds the whole text encoder (as the reference's accelerate state does); the saved
concept holds only the residual at the class word (``residual.mean_residual``), a few KB.

Not as the reference: no gradient clipping (it clips at norm 1.0; the shared loop has no clip).
"""

from __future__ import annotations

from typing import Mapping

import torch

from conceptflow.methods.base import ConceptTrainer
from conceptflow.methods.cones2.config import Cones2TrainConfig
from conceptflow.methods.cones2.residual import (
    RESIDUAL_TEMPLATES,
    class_word_token,
    embedding_regulariser,
    first_position,
    mean_residual,
    outputs_at_word,
    prompt_ids,
)
from conceptflow.train.common import ConceptTrainingSetup, denoising_loss, sample_batch

RESIDUAL_KEY = "text_residual"
STATE_PREFIX = "text_encoder."


class Cones2Method(ConceptTrainer):
    def __init__(self, setup: ConceptTrainingSetup, config: Cones2TrainConfig, device: str = "cpu"):
        super().__init__(setup, config, device)
        setup.embeddings.detach_hook()  # no concept tokens: the prompt is the class word
        setup.embeddings.weight.requires_grad_(False)
        tokenizer, text_encoder = setup.tokenizer, setup.text_encoder
        token_id = class_word_token(tokenizer, setup.class_word)
        self.train_ids = prompt_ids(tokenizer, [setup.class_word], config.pad_prompts).to(text_encoder.device)
        self.word_position = int(first_position(self.train_ids, token_id)[0])
        with torch.no_grad():  # e*: the base encoder's output on the training prompt (constant)
            self.target = text_encoder(self.train_ids)[0][0].detach().float()
        self.base_at_word = outputs_at_word(text_encoder, tokenizer, setup.class_word, RESIDUAL_TEMPLATES,
                                            config.pad_prompts)
        text_encoder.requires_grad_(True)
        self.trained = dict(text_encoder.named_parameters())

    def parameter_groups(self) -> list[dict]:
        return self.method_parameter_groups()  # no token embeddings

    def method_parameter_groups(self) -> list[dict]:
        return [{"params": list(self.trained.values()), "lr": self.config.lr_text_encoder,
                 "weight_decay": self.config.weight_decay}]

    def loss(self, step: int, generator: torch.Generator):
        config = self.config
        batch = sample_batch(self.setup, config.batch_size, generator)
        hidden = self.setup.text_encoder(self.train_ids)[0]  # (1, T, D): one prompt for every image
        regulariser = embedding_regulariser(hidden[0], self.target, self.word_position,
                                            config.bos_weight, config.rest_weight)
        text = hidden.expand(config.batch_size, -1, -1)
        prediction = self.setup.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=text).sample
        denoise = denoising_loss(prediction, batch, config.masked_loss)
        return denoise + regulariser, {"denoise": float(denoise.detach()), "regulariser": float(regulariser.detach())}

    def after_step(self) -> None:
        pass  # no embeddings to freeze

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.method_state()

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.load_method_state(state)

    def method_state(self) -> dict[str, torch.Tensor]:
        return {f"{STATE_PREFIX}{name}": parameter.detach() for name, parameter in self.trained.items()}

    def load_method_state(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = {f"{STATE_PREFIX}{name}" for name in self.trained}
        if set(state) != expected:
            raise ValueError(f"cones2 checkpoint keys differ from the text encoder's: missing "
                             f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}")
        with torch.no_grad():
            for name, parameter in self.trained.items():
                parameter.copy_(state[f"{STATE_PREFIX}{name}"])

    def residual(self) -> torch.Tensor:
        """(D,) the mean residual of the tuned encoder over the templates at the class word."""
        tuned = outputs_at_word(self.setup.text_encoder, self.setup.tokenizer, self.setup.class_word,
                                RESIDUAL_TEMPLATES, self.config.pad_prompts)
        return mean_residual(tuned, self.base_at_word)

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Only the residual (no embeddings, no weights)."""
        return {RESIDUAL_KEY: self.residual().cpu().contiguous()}, self.method_meta()

    def method_meta(self) -> dict:
        return {"prompt_word": self.setup.class_word, "layer_tokens": [],
                "residual_templates": len(RESIDUAL_TEMPLATES), "pad_prompts": self.config.pad_prompts}
