"""Textual Localization (002 §3): a group's concepts learnt together from photos showing them.

One training step, for ``batch_size`` group photos z and their captions (``<a> and <b>``):

    L = L_denoise(photos, mask = union of the concepts' masks)
      + prior_weight · L_denoise(class-prior images, "a photo of a <class word>")   (one per concept per photo)
      + attention_weight · mean_c MSE(CA_c, M_c)        (hard; soft: × 1[M_c = 0])

CA_c is concept c's cross-attention map (its two tokens' attention summed, mean over heads and
over the layers of each resolution in ``attention_scales``, upsampled to ``map_fraction`` of the
image, min-max normalised, averaged over resolutions: ``losses.localization_maps``); M_c its mask.
The token positions are found in each prompt (the reference hard-codes 4 and 8).

Trained: every group member's layer tokens (lr ``lr_embeddings``) and the key and value weights
of every UNet cross-attention layer (Custom Diffusion; lr ``lr_kv``, scaled as the reference's
``scale_lr``, AdamW weight decay 1e-2). The K/V update is shared by the group; each member's
concept folder holds it with its own tokens (``stages.train_group``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from conceptflow.adapters.tokens import token_positions
from conceptflow.attention.processor import CrossAttentionMapRecorder
from conceptflow.errors import ConceptflowError
from conceptflow.methods.base import EMBEDDINGS_STATE, ConceptTrainer
from conceptflow.methods.textual_localization.config import TextualLocalizationTrainConfig
from conceptflow.methods.textual_localization.group_setup import GROUP_PROMPT_TEMPLATES, GroupTrainingSetup
from conceptflow.methods.textual_localization.losses import localization_loss, localization_maps
from conceptflow.train.common import NoisedBatch, denoising_loss

UNET_PREFIX = "unet."
KV_NAMES = ("to_k", "to_v")


def cross_attention_kv(unet) -> dict[str, torch.nn.Linear]:
    """``{module path: linear}`` of the key and value projections of every cross-attention layer."""
    found = {}
    for name, module in unet.named_modules():
        if getattr(module, "is_cross_attention", False):
            for part in KV_NAMES:
                found[f"{name}.{part}"] = getattr(module, part)
    if not found:
        raise ConceptflowError("the UNet has no cross-attention layers to train")
    return found


class TextualLocalizationMethod(ConceptTrainer):
    def __init__(self, setup: GroupTrainingSetup, config: TextualLocalizationTrainConfig, device: str = "cpu"):
        super().__init__(setup, config, device)
        self.kv = cross_attention_kv(setup.unet)
        self.base_kv = {path: linear.weight.detach().clone() for path, linear in self.kv.items()}
        for linear in self.kv.values():
            linear.weight.requires_grad_(True)
        latent_side = setup.latents.shape[-1]
        self.sides = tuple(latent_side // scale for scale in config.attention_scales if latent_side % scale == 0)
        self._positions: dict[str, tuple[list[int], list[bool]]] = {}

    # --- TrainingMethod -------------------------------------------------------------------

    def kv_learning_rate(self) -> float:
        lr = self.config.lr_kv
        if self.config.scale_lr:
            lr *= self.config.batch_size * (2.0 if self._with_prior else 1.0)
        return lr

    @property
    def _with_prior(self) -> bool:
        return self.setup.prior_latents is not None and self.config.prior_weight > 0

    def method_parameter_groups(self) -> list[dict]:
        return [{"params": [linear.weight for linear in self.kv.values()], "lr": self.kv_learning_rate(),
                 "weight_decay": self.config.weight_decay}]

    def loss(self, step: int, generator: torch.Generator):
        setup, config = self.setup, self.config
        batch = self._sample(generator)
        count = batch.indices.shape[0]
        text = setup.encode(batch.prompts)
        positions, present = self._prompt_positions(batch.prompts)
        recorder = CrossAttentionMapRecorder(positions, keep_graph=True)
        with setup.controller.use(recorder):
            prediction = setup.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=text).sample
        instance = NoisedBatch(batch.indices, batch.latents[:count], batch.noisy_latents[:count], batch.noise[:count],
                               batch.timesteps[:count], batch.masks, batch.prompts[:count])
        loss_denoise = denoising_loss(prediction[:count], instance, config.masked_loss)
        loss = loss_denoise
        logs = {"loss_denoise": float(loss_denoise.detach())}
        if prediction.shape[0] > count:
            loss_prior = torch.nn.functional.mse_loss(prediction[count:].float(), batch.noise[count:].float())
            loss = loss + config.prior_weight * loss_prior
            logs["loss_prior"] = float(loss_prior.detach())
        summed = {name: self._per_concept(maps[:count]) for name, maps in recorder.maps.items()}
        recorder.clear()
        maps = localization_maps(summed, self.sides, setup.concept_masks.shape[-1])
        loss_attention = localization_loss(maps, setup.concept_masks[batch.indices.to(maps.device)].to(maps.dtype),
                                           config.guidance, present[:count].to(maps.device))
        loss = loss + config.attention_weight * loss_attention
        logs.update({"loss_attention": float(loss_attention.detach()), "embedding_norm": setup.embeddings.mean_norm()})
        return loss, logs

    def method_state(self) -> dict[str, torch.Tensor]:
        # Full weights (not W - W0): a resumed run continues from exactly the checkpointed values.
        return {f"{UNET_PREFIX}{path}.weight": linear.weight.detach() for path, linear in self.kv.items()}

    def load_method_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for path, linear in self.kv.items():
                linear.weight.copy_(state[f"{UNET_PREFIX}{path}.weight"])

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Every member's token rows and the shared ΔW = W − W0 of each K/V (``unet.<path>``)."""
        tensors, meta = super().export()
        for path, linear in self.kv.items():
            del tensors[f"{UNET_PREFIX}{path}.weight"]
            tensors[f"{UNET_PREFIX}{path}"] = (linear.weight.detach().float() - self.base_kv[path].float()).contiguous()
        return tensors, meta

    def method_meta(self) -> dict:
        return {"adapter": "custom_diffusion_kv", "unet_targets": sorted(self.kv), "group": self.setup.concept_name,
                "group_concepts": self.setup.names, "guidance": self.config.guidance,
                "attention_sides": list(self.sides)}

    # --- helpers ----------------------------------------------------------------------------

    def _sample(self, generator: torch.Generator) -> NoisedBatch:
        """Photos (and one class-prior image per concept per photo), noise, timesteps, prompts."""
        setup = self.setup
        count = self.config.batch_size
        indices = torch.randint(0, setup.latents.shape[0], (count,), generator=generator)
        template_ids = torch.randint(0, len(GROUP_PROMPT_TEMPLATES), (count,), generator=generator)
        prompts = [setup.prompt(int(i), int(t)) for i, t in zip(indices, template_ids)]
        latents = setup.latents[indices]
        if self._with_prior:
            members, per_class = setup.prior_latents.shape[:2]
            picks = torch.randint(0, per_class, (count, members), generator=generator)
            prior = [setup.prior_latents[m, picks[b, m]] for b in range(count) for m in range(members)]
            latents = torch.cat([latents, torch.stack(prior)])
            prompts += [setup.class_prompt(m) for _ in range(count) for m in range(members)]
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = torch.randint(0, setup.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(latents.device)
        noisy = setup.noise_scheduler.add_noise(latents, noise, timesteps)
        return NoisedBatch(indices, latents, noisy, noise, timesteps, setup.union_masks[indices], prompts)

    def _prompt_positions(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2C) token positions (each member's two tokens; 0 where absent) and (B, C) presence."""
        rows, present = [], []
        for prompt in prompts:
            if prompt not in self._positions:
                positions, found = [], []
                for name in self.setup.names:
                    at = token_positions(prompt, self.setup.tokenizer, name, 0) if f"<{name}>" in prompt else []
                    if len(at) not in (0, 2):
                        raise ConceptflowError(f"caption {prompt!r} must name <{name}> at most once")
                    positions += at or [0, 0]
                    found.append(bool(at))
                self._positions[prompt] = (positions, found)
            rows.append(self._positions[prompt][0])
            present.append(self._positions[prompt][1])
        return torch.tensor(rows, dtype=torch.long), torch.tensor(present, dtype=torch.bool)

    @staticmethod
    def _per_concept(token_maps: torch.Tensor) -> torch.Tensor:
        """(B, Q, 2C) maps of each member's two tokens -> (B, Q, C), their sum."""
        batch, queries, pairs = token_maps.shape
        return token_maps.view(batch, queries, pairs // 2, 2).sum(dim=-1)


__all__ = ["EMBEDDINGS_STATE", "TextualLocalizationMethod", "cross_attention_kv"]
