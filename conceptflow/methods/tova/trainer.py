"""ConceptSplit ToVA: a value LoRA of cross-attention applied only at the concept token's rows.

As the reference (``train_dreambooth_lora_sd_ToVA.py``): the UNet and the text encoder stay
frozen, the LoRA (rank 32, multiplier 1, gaussian init) is trained at lr 5e-4 for 300 steps on
the plain denoising loss, and each step draws another prompt (prompt regularisation,
``conceptflow.methods.tova.prompts``). The token positions are found in every prompt.

**The concept's token.** The reference has none of its own: it adapts the values at the class
word ("dog") and trains no embedding. Here the concept keeps the project's reference ``<name>``
(two tokens per cross-attention layer, ``adapters.tokens``), so that two ToVA concepts of one
class word (two dogs) have distinct positions and prompts name concepts the same way for every
method; both tokens' embeddings are set to the class word's and are not trained (unless
``train_embeddings``), so the text encoder sees the class word there and the keys, hence the
attention maps, stay the base's: what ToVA's design keeps (ConceptSplit Table 1).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from conceptflow.adapters.tokens import initial_embeddings
from conceptflow.methods.base import ConceptTrainer
from conceptflow.methods.tova.config import ToVATrainConfig
from conceptflow.methods.tova.prompts import PROMPT_TEMPLATES
from conceptflow.methods.tova.token_lora import TokenLoRA, TokenLoRAHook, token_mask
from conceptflow.train.common import ConceptTrainingSetup, NoisedBatch, denoising_loss, sample_batch


def class_word_rows(setup: ConceptTrainingSetup) -> torch.Tensor:
    """(n_layers * 2, dim): the class word's embedding (as ED-LoRA's second token starts) for every token."""
    rows = initial_embeddings(setup.tokenizer, setup.text_encoder, setup.class_word, setup.n_layers,
                              torch.Generator().manual_seed(0))
    return rows[1].float().expand(len(setup.token_strings), -1).clone()


class ToVAMethod(ConceptTrainer):
    def __init__(self, setup: ConceptTrainingSetup, config: ToVATrainConfig, device: str = "cpu"):
        super().__init__(setup, config, device)
        self.lora = TokenLoRA(setup.unet, setup.controller.cross_layers, config.targets, config.rank,
                              config.alpha).to(device)
        embeddings = setup.embeddings.weight
        embeddings.data = class_word_rows(setup).to(embeddings.device)
        embeddings.requires_grad_(config.train_embeddings)

    def parameter_groups(self) -> list[dict]:
        if self.config.train_embeddings:
            return super().parameter_groups()
        return self.method_parameter_groups()

    def method_parameter_groups(self) -> list[dict]:
        return [{"params": list(self.lora.parameters()), "lr": self.config.lr_lora}]

    def prompts(self, batch: NoisedBatch, generator: torch.Generator) -> list[str]:
        """The step's prompts: an image's own caption, else a template drawn from ToVA's list."""
        if not self.config.prompt_regularisation:
            return batch.prompts
        drawn = torch.randint(0, len(PROMPT_TEMPLATES), (len(batch.prompts),), generator=generator).tolist()
        captions = self.setup.captions or [None] * self.setup.latents.shape[0]
        return [captions[int(index)] if captions[int(index)] is not None
                else PROMPT_TEMPLATES[template].format(f"<{self.setup.concept_name}>")
                for index, template in zip(batch.indices, drawn)]

    def loss(self, step: int, generator: torch.Generator):
        batch = sample_batch(self.setup, self.config.batch_size, generator)
        batch = dataclasses.replace(batch, prompts=self.prompts(batch, generator))
        text = self.setup.encode(batch.prompts)
        mask = token_mask(batch.prompts, self.setup.tokenizer, self.setup.concept_name).to(text.device)
        with self.setup.controller.use(TokenLoRAHook(self.lora, mask)):
            prediction = self.setup.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=text).sample
        loss = denoising_loss(prediction, batch, self.config.masked_loss)
        return loss, {"token_rows": float(mask.sum()) / len(batch.prompts)}

    def method_state(self) -> dict[str, torch.Tensor]:
        return self.lora.state()

    def load_method_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.lora.load(state)

    def method_meta(self) -> dict:
        return {"rank": self.config.rank, "alpha": self.config.alpha, "targets": list(self.config.targets),
                "token_paths": list(self.lora.paths), "at_tokens": list(self.setup.token_strings)}
