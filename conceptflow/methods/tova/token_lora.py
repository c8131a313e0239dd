"""A LoRA on cross-attention projections that acts only at a concept token's positions.

ConceptSplit's ToVA (token-wise value adaptation): for a cross-attention layer with text
context c (batch, T tokens, C) and value projection W_v,

    v[b, t] = W_v c[b, t] + m[b, t] * alpha * B A c[b, t],      m[b, t] = 1 iff token t of prompt b
                                                                  is one of the concept's tokens,

so the value rows of every other token (and the keys, hence the attention maps) are the base's.
The reference (``CustomLinear``, l.590-646 of ``train_dreambooth_lora_sd_ToVA.py``) wraps the peft
layer and adds the LoRA output at one index found in the batch's first prompt; here each prompt
of a batch gets its own positions (``token_mask``) and the update is applied by the project's
attention hook (``AttentionHook.edit_key_value``), not by replacing modules.

Saved tensors are named as peft names them (``unet.<layer>.to_v.lora_A.weight`` / ``lora_B``),
so the merged ΔW = alpha · B @ A of each layer comes from ``edlora.lora.lora_deltas``; at run
time that ΔW is a ``TokenDelta`` which ``adapters.branched`` adds at the same positions.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from conceptflow.adapters.tokens import token_positions
from conceptflow.attention.processor import AttentionHook, AttentionLayer
from conceptflow.errors import ConceptflowError


class LoRAPair(nn.Module):
    """down (rank, in) and up (out, rank): peft's "gaussian" init, A ~ N(0, 1/rank), B = 0."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.lora_A.weight, std=1.0 / rank)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))


class TokenLoRA(nn.Module):
    """One ``LoRAPair`` per (cross-attention layer, target projection) of a UNet."""

    def __init__(self, unet, cross_layers: Sequence[AttentionLayer], targets: Sequence[str], rank: int, alpha: float):
        super().__init__()
        self.alpha = float(alpha)
        self.paths: list[str] = []  # "unet.<layer>.<target>", the keys of the saved tensors and token deltas
        self._at: dict[str, dict[str, str]] = {}  # layer name -> target -> module key
        pairs = {}
        for layer in cross_layers:
            attn = unet.get_submodule(layer.name)
            for target in targets:
                linear = getattr(attn, target)
                if not isinstance(linear, nn.Linear):
                    raise ConceptflowError(f"{layer.name}.{target} is a {type(linear).__name__}, not nn.Linear")
                if target == "to_k" and attn.norm_k is not None:
                    raise ConceptflowError(f"{layer.name} normalises its keys after to_k: a token update of to_k "
                                           "would act after the norm here but before it at run time")
                key = f"{layer.index}_{target}"
                pairs[key] = LoRAPair(linear.in_features, linear.out_features, rank)
                self._at.setdefault(layer.name, {})[target] = key
                self.paths.append(f"unet.{layer.name}.{target}")
        self.pairs = nn.ModuleDict(pairs)
        self._path_keys = dict(zip(self.paths, pairs))

    def at(self, layer_name: str) -> dict[str, LoRAPair]:
        """{target: pair} of a layer (empty for a layer without updates)."""
        return {target: self.pairs[key] for target, key in self._at.get(layer_name, {}).items()}

    def state(self) -> dict[str, torch.Tensor]:
        """``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` (detached copies)."""
        state = {}
        for path, key in self._path_keys.items():
            pair = self.pairs[key]
            state[f"{path}.lora_A.weight"] = pair.lora_A.weight.detach().clone()
            state[f"{path}.lora_B.weight"] = pair.lora_B.weight.detach().clone()
        return state

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.state())
        if set(state) != expected:
            raise ValueError(f"ToVA tensors do not fit this model: missing {sorted(expected - set(state))[:2]}, "
                             f"unexpected {sorted(set(state) - expected)[:2]}")
        with torch.no_grad():
            for path, key in self._path_keys.items():
                self.pairs[key].lora_A.weight.copy_(state[f"{path}.lora_A.weight"])
                self.pairs[key].lora_B.weight.copy_(state[f"{path}.lora_B.weight"])


def token_mask(prompts: Sequence[str], tokenizer, concept_name: str) -> torch.Tensor:
    """(len(prompts), T) True at the positions of the concept's tokens in each padded prompt."""
    mask = torch.zeros(len(prompts), tokenizer.model_max_length, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        mask[row, token_positions(prompt, tokenizer, concept_name)] = True
    return mask


class TokenLoRAHook(AttentionHook):
    """Adds ``alpha * B A c`` to the keys/values of the masked context rows of each adapted layer.

    ``mask`` (B, T) is the UNet call's: one row per sample, one column per text token.
    """

    def __init__(self, lora: TokenLoRA, mask: torch.Tensor):
        self.lora = lora
        self.mask = mask

    def edit_key_value(self, layer, query, key, value, context):
        pairs = self.lora.at(layer.name) if layer.is_cross else {}
        if not pairs:
            return key, value
        if tuple(self.mask.shape) != tuple(context.shape[:2]):
            raise ConceptflowError(f"ToVA token mask {tuple(self.mask.shape)} does not fit {layer.name}'s text "
                                   f"context {tuple(context.shape[:2])}")
        at_token = self.mask.to(context.device).unsqueeze(-1)
        if "to_k" in pairs:
            key = key + self._per_head(pairs["to_k"], context, at_token, key)
        if "to_v" in pairs:
            value = value + self._per_head(pairs["to_v"], context, at_token, value)
        return key, value

    def _per_head(self, pair: LoRAPair, context, at_token, like: torch.Tensor) -> torch.Tensor:
        update = self.lora.alpha * pair(context)  # (B, T, heads * d)
        update = torch.where(at_token, update, torch.zeros((), dtype=update.dtype, device=update.device))
        batch, heads, tokens, head_dim = like.shape
        return update.view(batch, tokens, heads, head_dim).transpose(1, 2).to(like.dtype)
